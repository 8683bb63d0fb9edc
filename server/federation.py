"""The coordinator's round loop: FedAvg over the hospitals connected to the SuperLink.

One `train` message per hospital per round carries the global weights; the reply carries
the hospital's update (plain or masked, by the aggregation: fedmri.server.fedavg.PlainFedAvg
or fedmri.server.secure_round.SecureFedAvg, one interface) and, from round 2 on, its
validation score of the previous global model (so evaluation costs no extra round trip). A
final `evaluate` message scores the last global model. After every round the global model and
the round history are checkpointed atomically, so a restarted coordinator resumes from the
last finished round.
"""

from __future__ import annotations

import json
import time
from typing import Protocol

import torch
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmri.common.checkpoint import save_json, save_model
from fedmri.common.config import RunConfig
from fedmri.common.models import build_model
from fedmri.proto import files, weights, wire
from fedmri.proto.events import Done, EventLog, Resumed, RoundDone, RoundSkipped, Started, Validated
from fedmri.proto.report import HospitalRound, RoundRecord
from fedmri.proto.run_config import ServerSettings
from fedmri.server.exchange import EventSink, Exchange, Reply, RoundOutcome
from fedmri.server.fedavg import PlainFedAvg, collect
from fedmri.server.secure_round import SecureFedAvg


class Aggregation(Protocol):
    """One FedAvg round: send `content` to `nodes`, return the replies and the new state."""

    def run(self, exchange: Exchange, nodes: list[int], content: RecordDict,
            global_state: dict[str, torch.Tensor]) -> RoundOutcome: ...


class Federation:
    def __init__(self, grid: Grid, cfg: RunConfig, settings: ServerSettings, run_id: str = "0",
                 emit: EventSink | None = None) -> None:
        self.grid, self.cfg, self.settings = grid, cfg, settings
        settings.out_dir.mkdir(parents=True, exist_ok=True)
        self.emit: EventSink = emit or EventLog(settings.out_dir / files.EVENTS)
        self.history: list[RoundRecord] = []
        self._started = False
        self.node_names: dict[int, str] = {}
        self.aggregation: Aggregation = (
            SecureFedAvg(run_id, settings.pinned_keys, cfg.secure_clip, cfg.secure_max_weight,
                         cfg.rounds, settings.round_timeout_s, settings.stage_timeout_s)
            if cfg.secure else PlainFedAvg(settings.round_timeout_s))
        self.global_state = build_model(cfg).state_dict()
        self._resume()

    # -- checkpoints ---------------------------------------------------------------------
    def _resume(self) -> None:
        """From the global model's file, which holds the round history too: written in one
        atomic step, it is never half a round ahead of itself (server_state.json, a copy for
        readers, may lag it by a round if the disk filled up between the two writes)."""
        model = self.settings.out_dir / files.GLOBAL_MODEL
        if not model.exists():
            return
        blob = torch.load(model, map_location="cpu", weights_only=True)
        if blob.get("config") != self.cfg.to_dict():
            raise ValueError(f"{model} belongs to a run with another config; "
                             "use a fresh output folder or the same config to resume")
        self.global_state = blob["state_dict"]
        rounds = blob.get("rounds")
        if rounds is None:  # written before the model file carried the history
            rounds = json.loads((self.settings.out_dir / files.SERVER_STATE).read_text())[
                "rounds"]
        self.history = [RoundRecord.from_dict(r) for r in rounds]
        self.emit(Resumed(len(self.history)))

    def _checkpoint(self) -> None:
        out = self.settings.out_dir
        rounds = [r.to_dict() for r in self.history]
        save_model(out / files.GLOBAL_MODEL, self.global_state, self.cfg.to_dict(),
                   {"round": len(self.history), "rounds": rounds})
        save_json(out / files.SERVER_STATE, {"config": self.cfg.to_dict(), "rounds": rounds})

    # -- messaging -----------------------------------------------------------------------
    def _wait_for_nodes(self) -> list[int]:
        """The connected nodes; the first round waits for `min_nodes`, later rounds go on with
        whoever is connected (a hospital that left is a dropout, not a reason to stall)."""
        required = self.settings.min_nodes if not self._started else 1
        deadline = time.monotonic() + self.settings.node_wait_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= required:
                self._started = True
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of {required} hospitals connected within "
                    f"{self.settings.node_wait_s:.0f}s; check that their SuperNodes are running")
            time.sleep(0.5)

    def _round_content(self, rnd: int, eval_first: bool) -> RecordDict:
        config = ConfigRecord({**self.cfg.to_dict(), wire.ROUND: rnd, wire.EVAL_FIRST: eval_first})
        return RecordDict({**weights.pack(self.global_state), wire.CONFIG: config})

    def _exchange(self, rnd: int) -> Exchange:
        return Exchange(self.grid, rnd, self.emit, self.node_names)

    # -- rounds --------------------------------------------------------------------------
    def _record_validation(self, replies: list[Reply]) -> None:
        """Attach validation scores of the last global model to the last round's record."""
        if not self.history:
            return
        last = self.history[-1]
        total, weighted = 0.0, 0.0
        for reply in replies:
            if wire.VAL_DICE not in reply.metrics:
                continue
            entry = last.hospitals.setdefault(reply.hospital, HospitalRound())
            entry.val_dice = reply.metrics[wire.VAL_DICE]
            entry.val_loss = reply.metrics.get(wire.VAL_LOSS)
            n = reply.metrics.get(wire.NUM_VAL, 0.0)
            total += n
            weighted += n * entry.val_dice
        if total:
            last.global_val_dice = weighted / total
            self.emit(Validated(last.round, last.global_val_dice))

    def run_round(self, rnd: int) -> None:
        started = time.perf_counter()
        exchange = self._exchange(rnd)
        outcome = self.aggregation.run(exchange, self._wait_for_nodes(),
                                       self._round_content(rnd, eval_first=rnd > 1),
                                       self.global_state)
        if outcome.new_state is not None:
            self.global_state = outcome.new_state
        else:
            self.emit(RoundSkipped(rnd, outcome.skipped))
        self._record_validation(outcome.replies)
        trained = outcome.replies
        train_s = max((r.metrics.get(wire.TRAIN_SECONDS, 0.0) for r in trained), default=0.0)
        seconds = time.perf_counter() - started
        self.history.append(RoundRecord(
            round=rnd, seconds=seconds, train_seconds=train_s,
            aggregate_seconds=outcome.aggregate_seconds,
            comm_seconds=max(0.0, seconds - train_s - outcome.aggregate_seconds),
            bytes_up=sum(r.upload_bytes for r in trained), bytes_down=exchange.bytes_down,
            failures=exchange.failures,
            hospitals={r.hospital: HospitalRound(
                num_examples=int(r.metrics.get(wire.NUM_EXAMPLES, 0)),
                train_loss=r.metrics.get(wire.TRAIN_LOSS),
                train_seconds=r.metrics.get(wire.TRAIN_SECONDS),
                mesh_setup_seconds=r.metrics.get(wire.MESH_SETUP_SECONDS)) for r in trained}))
        self._checkpoint()
        self.emit(RoundDone(rnd, round(seconds, 2), len(trained), len(exchange.failures),
                            {r.hospital: round(r.metrics.get(wire.TRAIN_LOSS, float("nan")), 4)
                             for r in trained}))

    def final_evaluation(self) -> None:
        """Score the final global model on every hospital's validation split."""
        started = time.perf_counter()
        exchange = self._exchange(len(self.history))
        content = self._round_content(len(self.history), False)
        messages = [exchange.message(RecordDict(dict(content.items())), n, MessageType.EVALUATE)
                    for n in self._wait_for_nodes()]
        self._record_validation(collect(exchange, messages, self.settings.round_timeout_s,
                                        expected=None))
        if self.history:
            self.history[-1].bytes_down += exchange.bytes_down
            self.history[-1].seconds += time.perf_counter() - started
        self._checkpoint()

    def run(self) -> list[RoundRecord]:
        self.emit(Started(self.cfg.rounds, len(self.history) + 1))
        for rnd in range(len(self.history) + 1, self.cfg.rounds + 1):
            self.run_round(rnd)
        if self.history and self.history[-1].global_val_dice is None:
            self.final_evaluation()
        self.emit(Done(len(self.history)))
        return self.history
