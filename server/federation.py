"""The coordinator's round loop: FedAvg over the hospitals connected to the SuperLink.

One `train` message per hospital per round carries the global weights; the reply carries
the hospital's weights and, from round 2 on, its validation score of the previous global
model (so evaluation costs no extra round trip). A final `evaluate` message scores the last
global model. After every round the global model and the round history are checkpointed
atomically, so a restarted coordinator resumes from the last finished round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmri.common import wire
from fedmri.common.checkpoint import save_json, save_model
from fedmri.common.config import RunConfig
from fedmri.common.identity import load_pinned
from fedmri.common.models import build_model
from fedmri.common.secagg import QuantConfig, SecAggError
from fedmri.common.vectors import apply_update, vector_length
from fedmri.server.fedavg import weighted_average
from fedmri.server.secure_round import Advertised, SecureRound, payload_bytes

log = logging.getLogger("fedmri.server")

EventSink = Callable[[dict[str, Any]], None]
MODEL_FILE = "global_model.pt"
STATE_FILE = "server_state.json"


@dataclass
class FederationSettings:
    out_dir: Path
    run_id: str = "0"
    pinned_keys: Path | None = None  # enrolled hospitals' identity keys (secure aggregation)
    min_nodes: int = 1
    node_wait_s: float = 300.0
    round_timeout_s: float = 3600.0  # a training step: the slowest hospital's training
    stage_timeout_s: float = 120.0  # a secure-aggregation step without training


@dataclass
class Reply:
    hospital: str
    metrics: dict[str, float]
    state: dict[str, torch.Tensor] | None = None
    upload_bytes: int = 0


@dataclass
class RoundOutcome:
    replies: list[Reply] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    aggregate_seconds: float = 0.0


def event_file_sink(out_dir: Path) -> EventSink:
    path = out_dir / "events.jsonl"

    def emit(event: dict[str, Any]) -> None:
        line = json.dumps({"time": round(time.time(), 3), **event})
        log.info(line)
        with path.open("a") as fh:
            fh.write(line + "\n")

    return emit


class Federation:
    def __init__(self, grid: Grid, cfg: RunConfig, settings: FederationSettings,
                 emit: EventSink | None = None) -> None:
        self.grid, self.cfg, self.settings = grid, cfg, settings
        settings.out_dir.mkdir(parents=True, exist_ok=True)
        self.emit = emit or event_file_sink(settings.out_dir)
        self.history: list[dict[str, Any]] = []
        self._started = False
        self.node_names: dict[int, str] = {}
        self._advertised: Advertised | None = None  # next round's keys, from the last unmask
        self.global_state = build_model(cfg).state_dict()
        self._resume()

    # -- checkpoints ---------------------------------------------------------------------
    def _resume(self) -> None:
        state_path = self.settings.out_dir / STATE_FILE
        if not state_path.exists():
            return
        saved = json.loads(state_path.read_text())
        if saved.get("config") != self.cfg.to_dict():
            raise ValueError(f"{state_path} belongs to a run with another config; "
                             "use a fresh output folder or the same config to resume")
        blob = torch.load(self.settings.out_dir / MODEL_FILE, map_location="cpu",
                          weights_only=True)
        self.global_state = blob["state_dict"]
        self.history = saved["rounds"]
        self.emit({"event": "resumed", "round": len(self.history)})

    def _checkpoint(self) -> None:
        out = self.settings.out_dir
        save_model(out / MODEL_FILE, self.global_state, self.cfg.to_dict(),
                   {"round": len(self.history)})
        save_json(out / STATE_FILE, {"config": self.cfg.to_dict(), "rounds": self.history})

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
        return RecordDict({wire.ARRAYS: ArrayRecord(self.global_state), wire.CONFIG: config})

    def _secure_round(self, rnd: int, eval_first: bool
                      ) -> tuple[RoundOutcome, int, dict[str, torch.Tensor] | None]:
        """Steps of SecureRound; returns replies (metrics only) and the new global state,
        or None when the round fell below the threshold (the model stays as it was)."""
        if self.settings.pinned_keys is None:
            raise ValueError("secure aggregation needs the run config 'pinned-keys' (the "
                             "enrolled hospitals' identity keys)")
        pinned = load_pinned(self.settings.pinned_keys)
        quant = QuantConfig.for_clients(len(pinned), self.cfg.secure_clip,
                                        self.cfg.secure_max_weight)
        base = self._round_content(rnd, eval_first)
        secure = SecureRound(self.grid, self.settings.run_id, rnd, pinned, quant,
                             vector_length(self.global_state), self.settings.round_timeout_s,
                             self.emit, stage_timeout_s=self.settings.stage_timeout_s,
                             known_nodes=self.node_names, advertised=self._advertised)
        new_state = None
        try:
            result = secure.run(self._wait_for_nodes(), base,
                                advertise_next=rnd < self.cfg.rounds)
            assert result.mean_update is not None
            new_state = apply_update(self.global_state, result.mean_update)
            self.emit({"event": "secure_sum", "round": rnd, "survivors": list(result.survivors),
                       "error_bound": result.error_bound})
        except SecAggError as err:
            self.emit({"event": "round_skipped", "round": rnd,
                       "reason": f"secure aggregation failed, global model unchanged: {err}"})
        self.node_names.update(secure.hospital_of)
        self._advertised = secure.next
        outcome = RoundOutcome(failures=list(secure.outcome.failures))
        for item in secure.outcome.replies:
            metrics = {k: float(v)  # type: ignore[arg-type]
                       for k, v in item.message.content.metric_records[wire.METRICS].items()}
            outcome.replies.append(Reply(item.hospital, metrics, upload_bytes=item.upload_bytes))
        outcome.aggregate_seconds = secure.outcome.aggregate_seconds
        return outcome, secure.outcome.bytes_down, new_state

    def _send(self, message_type: str, rnd: int, eval_first: bool) -> tuple[RoundOutcome, int]:
        nodes = self._wait_for_nodes()
        outgoing = self._round_content(rnd, eval_first)
        messages = [Message(RecordDict(dict(outgoing.items())),
                            dst_node_id=node, message_type=message_type, group_id=str(rnd))
                    for node in nodes]
        replies = list(self.grid.send_and_receive(messages,
                                                  timeout=self.settings.round_timeout_s))
        outcome = RoundOutcome()
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                outcome.failures.append(f"node {node}: {reply.error.reason}")
                continue
            content = reply.content
            hospital = str(content.config_records[wire.INFO][wire.HOSPITAL])
            metrics = {k: float(v) for k, v in content.metric_records[wire.METRICS].items()}  # type: ignore[arg-type]
            item = Reply(hospital, metrics)
            if wire.ARRAYS in content.array_records:
                record = content.array_records[wire.ARRAYS]
                item.state = record.to_torch_state_dict()
                item.upload_bytes = payload_bytes(content)
            outcome.replies.append(item)
        for node in nodes:
            if node not in answered:
                outcome.failures.append(f"node {node}: no reply within "
                                        f"{self.settings.round_timeout_s:.0f}s")
        for failure in outcome.failures:
            self.emit({"event": "hospital_failed", "round": rnd, "reason": failure})
        return outcome, payload_bytes(outgoing) * len(nodes)

    # -- rounds --------------------------------------------------------------------------
    def _record_validation(self, outcome: RoundOutcome) -> None:
        """Attach validation scores of the last global model to the last round's record."""
        if not self.history:
            return
        last = self.history[-1]
        total, weighted = 0.0, 0.0
        for reply in outcome.replies:
            if wire.VAL_DICE not in reply.metrics:
                continue
            entry = last["hospitals"].setdefault(reply.hospital, {})
            entry["val_dice"] = reply.metrics[wire.VAL_DICE]
            entry["val_loss"] = reply.metrics[wire.VAL_LOSS]
            n = reply.metrics[wire.NUM_VAL]
            total += n
            weighted += n * reply.metrics[wire.VAL_DICE]
        if total:
            last["global_val_dice"] = weighted / total
            self.emit({"event": "validated", "round": last["round"],
                       "global_val_dice": last["global_val_dice"]})

    def run_round(self, rnd: int) -> None:
        started = time.perf_counter()
        if self.cfg.secure:
            outcome, bytes_down, new_state = self._secure_round(rnd, eval_first=rnd > 1)
            comm_done = agg_start = time.perf_counter()
            trained = sorted(outcome.replies, key=lambda r: r.hospital)
            if new_state is not None:
                self.global_state = new_state
        else:
            outcome, bytes_down = self._send(MessageType.TRAIN, rnd, eval_first=rnd > 1)
            comm_done = time.perf_counter()
            # Sorted, so the float sums (and the model) do not depend on reply arrival order.
            trained = sorted((r for r in outcome.replies if r.state is not None),
                             key=lambda r: r.hospital)
            agg_start = time.perf_counter()
            if trained:
                self.global_state = weighted_average(
                    [(r.state, r.metrics[wire.NUM_EXAMPLES]) for r in trained if r.state])
            else:
                self.emit({"event": "round_skipped", "round": rnd,
                           "reason": "no hospital returned weights; global model unchanged"})
        self._record_validation(outcome)
        aggregate_s = outcome.aggregate_seconds or time.perf_counter() - agg_start
        train_s = max((r.metrics[wire.TRAIN_SECONDS] for r in trained), default=0.0)
        seconds = time.perf_counter() - started
        record = {
            "round": rnd,
            "seconds": seconds,
            "train_seconds": train_s,
            "aggregate_seconds": aggregate_s,
            # Everything in the round that is neither the slowest hospital's training nor the
            # aggregation: message latency, ClientApp start-up, data loading, validation.
            "comm_seconds": max(0.0, (comm_done - started) - train_s),
            "bytes_up": sum(r.upload_bytes for r in trained),
            "bytes_down": bytes_down,
            "global_val_dice": None,
            "failures": outcome.failures,
            "hospitals": {
                r.hospital: {"train_loss": r.metrics[wire.TRAIN_LOSS],
                             "num_examples": int(r.metrics[wire.NUM_EXAMPLES]),
                             "train_seconds": r.metrics[wire.TRAIN_SECONDS],
                             "val_dice": None}
                for r in trained
            },
        }
        self.history.append(record)
        self._checkpoint()
        self.emit({"event": "round_done", "round": rnd, "seconds": round(seconds, 2),
                   "hospitals": len(trained), "failures": len(outcome.failures),
                   "train_loss": {r.hospital: round(r.metrics[wire.TRAIN_LOSS], 4)
                                  for r in trained}})

    def final_evaluation(self) -> None:
        started = time.perf_counter()
        outcome, bytes_down = self._send(MessageType.EVALUATE, len(self.history), False)
        self._record_validation(outcome)
        if self.history:
            self.history[-1]["bytes_down"] += bytes_down
            self.history[-1]["seconds"] += time.perf_counter() - started
        self._checkpoint()

    def run(self) -> list[dict[str, Any]]:
        self.emit({"event": "started", "rounds": self.cfg.rounds,
                   "from_round": len(self.history) + 1})
        for rnd in range(len(self.history) + 1, self.cfg.rounds + 1):
            self.run_round(rnd)
        if self.history and self.history[-1].get("global_val_dice") is None:
            self.final_evaluation()
        self.emit({"event": "done", "rounds": len(self.history)})
        return self.history
