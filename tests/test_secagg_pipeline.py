"""Pipelined secure aggregation: round r+1's advertise rides on round r's unmask step.

The real server (`SecureRound`) talks to the real hospital handlers (`secure_client`, with their
state files, identity keys and pinned sets on disk) through a loopback Grid that delivers every
Flower message in process, so the rounds' message flow is observable and dropouts, replays and
tampering can be injected between the two sides.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from conftest import LoopbackGrid
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedmri.client import secure_client
from fedmri.common.identity import load_pinned
from fedmri.common.secagg import (
    Advertise,
    KeysBroadcast,
    QuantConfig,
    ReplayError,
    RoundSetup,
    SecAggError,
    UnmaskRequest,
)
from fedmri.deploy.enrollment import enroll_hospitals, enrolled_node
from fedmri.proto import wire
from fedmri.proto.node_config import NodeConfig
from fedmri.server.exchange import Exchange
from fedmri.server.secure_round import Advertised, SecureResult, SecureRound

pytestmark = pytest.mark.usefixtures("serverapp_identity")
LENGTH, RUN = 16, "7"


def update_of(node: int, rnd: int) -> np.ndarray:
    return np.random.default_rng([node, rnd]).uniform(-0.5, 0.5, LENGTH).astype(np.float32)


def weight_of(node: int) -> int:
    return 10 * node + 3


def hospital(msg: Message, context: Context) -> Message:
    """What the hospital's ClientApp runs for each secure-aggregation stage."""
    node = NodeConfig.from_context(context)
    if msg.metadata.message_type == MessageType.TRAIN:
        rnd, index = int(msg.metadata.group_id), context.node_id
        records = secure_client.mask(msg, node, update_of(index, rnd), weight_of(index),
                                     secure_client.training_input({}, rnd))
        records[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: weight_of(index)})
        return Message(records, reply_to=msg)
    return secure_client.query_step(msg, node)


class Federation:
    """N enrolled hospitals on nodes 1..N and the server's round loop, as fedmri runs it."""

    def __init__(self, folder: Path, n: int, rounds: int) -> None:
        names = [f"hospital-{i}" for i in range(1, n + 1)]
        pinned_path = enroll_hospitals(folder, names)
        self.pinned = load_pinned(pinned_path)
        self.state_dirs = {i: folder / h / "state" for i, h in enumerate(names, 1)}
        self.grid = LoopbackGrid({
            i: Context(run_id=int(RUN), node_id=i, node_config=enrolled_node(
                folder, h, pinned_path).to_node_config(), state=RecordDict(), run_config={})
            for i, h in enumerate(names, 1)}, hospital)
        self.quant = QuantConfig.for_clients(n, 1.0, 100)
        self.rounds = rounds
        self.advertised: Advertised | None = None  # the next round's keys, as fedmri keeps them
        self.failures: dict[int, list[str]] = {}
        self.run = RUN

    def new_run(self, run: str) -> None:
        """The same hospitals (keys, state folders) in another Flower run: a resumed or
        repeated run, as the coordinator submits it after a restart."""
        self.run, self.advertised = run, None
        for context in self.grid.contexts.values():
            context.run_id = int(run)

    def round(self, rnd: int) -> SecureResult | SecAggError:
        exchange = Exchange(self.grid, rnd, lambda event: None, {})
        # The loopback answers at once: a reply not there within a second was dropped.
        secure = SecureRound(exchange, self.run, self.pinned, self.quant, LENGTH, 1.0, 1.0,
                             advertised=self.advertised)
        nodes = sorted(self.grid.get_node_ids())
        content = RecordDict({wire.CONFIG: ConfigRecord({wire.ROUND: rnd})})
        try:
            result: SecureResult | SecAggError = secure.run(
                nodes, content, advertise_next=rnd < self.rounds)
        except SecAggError as err:  # below threshold: the caller keeps its model
            result = err
        self.advertised = secure.next
        self.failures[rnd] = exchange.failures
        return result

    def states(self, node: int) -> list[str]:
        return sorted(p.name for p in self.state_dirs[node].glob("*.state"))


def expected_mean(nodes: Iterable[int], rnd: int) -> np.ndarray:
    nodes = list(nodes)
    total = sum(weight_of(n) * np.clip(update_of(n, rnd).astype(np.float64), -1, 1)
                for n in nodes)
    return np.asarray(total) / sum(weight_of(n) for n in nodes)


def assert_exact(outcome: SecureResult | SecAggError, survivors: list[int], rnd: int) -> None:
    """The aggregate is the survivors' weighted mean (integer weight sum exact, mean within
    the quantization bound)."""
    assert isinstance(outcome, SecureResult), outcome
    assert outcome.survivors == tuple(f"hospital-{n}" for n in survivors)
    assert outcome.total_weight == sum(weight_of(n) for n in survivors)
    assert outcome.mean_update is not None
    err = np.abs(outcome.mean_update - expected_mean(survivors, rnd))
    assert float(err.max()) <= outcome.error_bound + 1e-12


def test_piggybacked_advertise_gives_exact_rounds_in_two_round_trips(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=4, rounds=4)
    everyone = [1, 2, 3, 4]
    for rnd in range(1, 5):
        assert_exact(fed.round(rnd), everyone, rnd)
        stages = fed.grid.stages(rnd)
        expected = ({wire.STAGE_ADVERTISE, wire.STAGE_MASK, wire.STAGE_UNMASK} if rnd == 1
                    else {wire.STAGE_MASK, wire.STAGE_UNMASK})
        assert set(stages) == expected, (rnd, stages)
        assert all(sorted(nodes) == everyone for nodes in stages.values())
        # The unmask request carries the next round's setup, except in the last round.
        assert {next_ for r, _, s, next_ in fed.grid.log
                if r == rnd and s == wire.STAGE_UNMASK} == {rnd < 4}
        # Each hospital keeps only the secret state of the round to come.
        for node in everyone:
            assert fed.states(node) == ([f"secagg-{RUN}-{rnd + 1}.state"] if rnd < 4 else [])
        assert fed.failures[rnd] == []
    assert fed.advertised is None


def test_dropout_during_unmask_and_advertise(tmp_path: Path) -> None:
    """Node 5 is silent in round 1's unmask+advertise step and down through round 2: round 1 is
    still exact with it (its self mask comes from the others' shares), round 2 goes on without
    it after one advertise to it alone, round 3 takes it back with a separate advertise."""
    fed = Federation(tmp_path, n=5, rounds=3)  # t = 3 of 5

    def node5_down(rnd: int, stage: str, msg: Message) -> bool:
        down = rnd == 2 or (rnd == 1 and stage == wire.STAGE_UNMASK)
        return not (down and msg.metadata.dst_node_id == 5)

    fed.grid.on_request = node5_down
    assert_exact(fed.round(1), [1, 2, 3, 4, 5], 1)
    assert fed.advertised is not None and sorted(fed.advertised.hospital_of) == [1, 2, 3, 4]
    assert_exact(fed.round(2), [1, 2, 3, 4], 2)
    assert fed.grid.stages(2)[wire.STAGE_ADVERTISE] == [5]
    assert sorted(fed.grid.stages(2)[wire.STAGE_MASK]) == [1, 2, 3, 4]
    assert any("hospital-5" in f or "node 5" in f for f in fed.failures[2])
    assert_exact(fed.round(3), [1, 2, 3, 4, 5], 3)
    assert fed.grid.stages(3)[wire.STAGE_ADVERTISE] == [5]
    # Node 5's round-1 state (never unmasked) went when it made its round-3 keys.
    assert fed.states(5) == [] and fed.states(1) == []


@pytest.mark.parametrize("stage", [wire.STAGE_MASK, wire.STAGE_UNMASK])
def test_round_below_threshold_keeps_going(tmp_path: Path, stage: str) -> None:
    """Three of five hospitals silent in round 1's mask (or unmask) step: round 1 fails, and
    round 2 runs with everyone, advertising only to those without keys for it."""
    fed = Federation(tmp_path, n=5, rounds=2)
    fed.grid.on_request = lambda rnd, s, msg: not (
        rnd == 1 and s == stage and msg.metadata.dst_node_id in (1, 2, 3))
    assert isinstance(fed.round(1), SecAggError)
    assert_exact(fed.round(2), [1, 2, 3, 4, 5], 2)
    # After a failed mask step no unmask (and no piggybacked advertise) happened.
    renewed = [1, 2, 3, 4, 5] if stage == wire.STAGE_MASK else [1, 2, 3]
    assert sorted(fed.grid.stages(2)[wire.STAGE_ADVERTISE]) == renewed
    for node in range(1, 6):
        assert fed.states(node) == []  # the failed round's leftovers were deleted too


def test_round_r_advertise_replayed_into_round_r_plus_1_is_rejected(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=4, rounds=3)
    round1: dict[int, bytes] = {}

    def capture_and_replay(rnd: int, stage: str, reply: Message) -> bool:
        record = reply.content.config_records[wire.SECAGG]
        node = reply.metadata.src_node_id
        if rnd == 1 and stage == wire.STAGE_ADVERTISE:
            round1[node] = bytes(record[wire.SECAGG_ADVERT])  # type: ignore[arg-type]
        if rnd == 1 and stage == wire.STAGE_UNMASK and node == 2:
            record[wire.SECAGG_ADVERT] = round1[2]  # round 1's keys offered for round 2
        return True

    fed.grid.on_reply = capture_and_replay
    assert_exact(fed.round(1), [1, 2, 3, 4], 1)
    assert Advertise.from_bytes(round1[2]).round == 1
    assert any("hospital-2" in f and "round 2 rejected" in f and "round 1" in f
               for f in fed.failures[1]), fed.failures[1]
    assert fed.advertised is not None and sorted(fed.advertised.hospital_of) == [1, 3, 4]

    # Round 2: hospital 2 gets fresh keys by a separate advertise; the server (or a relay)
    # slipping hospital 2's round-1 keys to hospital 1 instead is refused by hospital 1.
    def smuggle(rnd: int, stage: str, msg: Message) -> bool:
        if rnd == 2 and stage == wire.STAGE_MASK and msg.metadata.dst_node_id == 1:
            record = msg.content.config_records[wire.SECAGG]
            sent = KeysBroadcast.from_bytes(bytes(record[wire.SECAGG_KEYS]))  # type: ignore[arg-type]
            stale = Advertise.from_bytes(round1[2])
            swapped = tuple(stale if a.sender == "hospital-2" else a for a in sent.advertisements)
            record[wire.SECAGG_KEYS] = KeysBroadcast(sent.run_id, sent.round, sent.receiver,
                                                     swapped).to_bytes()
        return True

    fed.grid.on_reply = lambda rnd, stage, msg: True
    fed.grid.on_request = smuggle
    assert_exact(fed.round(2), [2, 3, 4], 2)
    assert fed.grid.stages(2)[wire.STAGE_ADVERTISE] == [2]
    assert any("hospital-1" in f and "ReplayError" in f and "round 1" in f
               for f in fed.failures[2]), fed.failures[2]


def test_client_refuses_a_piggybacked_setup_that_is_not_the_next_round(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=3, rounds=3)
    setups: dict[int, bytes] = {}

    def replay_setup(rnd: int, stage: str, msg: Message) -> bool:
        record = msg.content.config_records[wire.SECAGG]
        if stage == wire.STAGE_ADVERTISE:
            setups[rnd] = bytes(record[wire.SECAGG_SETUP])  # type: ignore[arg-type]
        if rnd == 1 and stage == wire.STAGE_UNMASK and msg.metadata.dst_node_id == 3:
            record[wire.SECAGG_SETUP] = setups[1]  # this round's setup again
        return True

    fed.grid.on_request = replay_setup
    # Hospital 3 refuses the setup but still reveals for round 1 (a refused next setup never
    # withholds the current reveal); it only has no keys for round 2 yet.
    assert_exact(fed.round(1), [1, 2, 3], 1)
    assert any("hospital-3" in f and "advertisement for round 2" in f for f in fed.failures[1])
    assert fed.advertised is not None and sorted(fed.advertised.hospital_of) == [1, 2]
    assert_exact(fed.round(2), [1, 2, 3], 2)
    assert fed.grid.stages(2)[wire.STAGE_ADVERTISE] == [3]


# --- a lying coordinator, through the hospitals' real handlers and state files ------------

def test_a_finished_round_cannot_be_rerun_or_replayed(tmp_path: Path) -> None:
    """Finding 2: after revealing for round 1 a hospital refuses round 1 again (a fresh setup
    or a replayed unmask request), so two aggregates of one round cannot be differenced."""
    fed = Federation(tmp_path, n=3, rounds=1)
    unmask: dict[int, Message] = {}

    def capture(rnd: int, stage: str, msg: Message) -> bool:
        if stage == wire.STAGE_UNMASK:
            unmask[msg.metadata.dst_node_id] = msg
        return True

    fed.grid.on_request = capture
    assert_exact(fed.round(1), [1, 2, 3], 1)
    for node in (1, 2, 3):
        assert fed.states(node) == []  # the round's secrets are gone
        last = fed.state_dirs[node] / f"secagg-{RUN}.last"
        assert json.loads(last.read_text()) == {"round": 1}
        assert oct(last.stat().st_mode & 0o777) == "0o600"
        assert oct(fed.state_dirs[node].stat().st_mode & 0o777) == "0o700"
    fed.grid.on_request = lambda rnd, stage, msg: True
    rerun = fed.round(1)  # the coordinator starts round 1 over
    assert isinstance(rerun, SecAggError)
    assert all("already revealed for round 1" in f for f in fed.failures[1]), fed.failures[1]
    with pytest.raises(ReplayError, match="already revealed for round 1"):
        hospital(unmask[2], fed.grid.contexts[2])


def test_a_round_lost_after_masking_is_not_masked_again_in_another_run(tmp_path: Path) -> None:
    """The coordinator stops after the masked updates of round 1 left (before or after the
    unmask: a hospital cannot tell) and resumes in a new Flower run. Round 1's inputs are
    refused there, so no second aggregate holds them: round 1 is lost, round 2 is exact."""
    fed = Federation(tmp_path, n=3, rounds=2)
    fed.grid.on_request = lambda rnd, stage, msg: stage in (wire.STAGE_ADVERTISE, wire.STAGE_MASK)
    assert isinstance(fed.round(1), SecAggError)  # stopped: nothing after the masked updates
    fed.grid.on_request = lambda rnd, stage, msg: True
    fed.new_run("8")
    again = fed.round(1)
    assert isinstance(again, SecAggError), again
    refusals = [f for f in fed.failures[1] if "ReplayError" in f]
    assert len(refusals) == 3 and all("run '7' round 1" in f for f in refusals), refusals
    assert_exact(fed.round(2), [1, 2, 3], 2)
    for node in (1, 2, 3):
        used = json.loads((fed.state_dirs[node] / "secagg-inputs.json").read_text())
        assert sorted((u["run"], u["round"]) for u in used.values()) == [("7", 1), ("8", 2)]
        assert oct((fed.state_dirs[node] / "secagg-inputs.json").stat().st_mode & 0o777) \
            == "0o600"


def test_an_unreadable_record_of_masked_inputs_refuses_every_round(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=3, rounds=1)
    fed.state_dirs[2].mkdir(parents=True, mode=0o700)
    (fed.state_dirs[2] / "secagg-inputs.json").write_text("{not json")
    assert_exact(fed.round(1), [1, 3], 1)  # the others go on without it
    assert any("hospital-2" in f and "unreadable" in f for f in fed.failures[1]), fed.failures


def test_a_setup_the_server_changed_for_one_hospital_is_refused(tmp_path: Path) -> None:
    """Different setups per hospital: the one given another graph seed refuses it; the round
    goes on without it."""
    fed = Federation(tmp_path, n=4, rounds=1)

    def other_seed(rnd: int, stage: str, msg: Message) -> bool:
        if stage == wire.STAGE_ADVERTISE and msg.metadata.dst_node_id == 2:
            record = msg.content.config_records[wire.SECAGG]
            setup = RoundSetup.from_bytes(bytes(record[wire.SECAGG_SETUP]))  # type: ignore[arg-type]
            record[wire.SECAGG_SETUP] = dataclasses.replace(setup, graph_seed=b"\1" * 32
                                                            ).to_bytes()
        return True

    fed.grid.on_request = other_seed
    assert_exact(fed.round(1), [1, 3, 4], 1)
    assert any("node 2" in f and "graph_seed" in f for f in fed.failures[1]), fed.failures[1]


def test_a_bad_share_is_blamed_on_its_sender_and_the_round_completes(tmp_path: Path) -> None:
    """Finding 3: hospital 2's share to hospital 1 is garbage; hospital 1 still reveals the rest,
    the round is exact (hospital 2 keeps t readable holders), and the server knows who."""
    fed = Federation(tmp_path, n=4, rounds=1)

    def corrupt(rnd: int, stage: str, msg: Message) -> bool:
        if stage == wire.STAGE_UNMASK and msg.metadata.dst_node_id == 1:
            record = msg.content.config_records[wire.SECAGG]
            req = UnmaskRequest.from_bytes(bytes(record[wire.SECAGG_REQUEST]))  # type: ignore[arg-type]
            shares = tuple(dataclasses.replace(s, ciphertext=b"\0" * len(s.ciphertext))
                           if s.sender == "hospital-2" else s for s in req.shares)
            record[wire.SECAGG_REQUEST] = dataclasses.replace(req, shares=shares).to_bytes()
        return True

    fed.grid.on_request = corrupt
    assert_exact(fed.round(1), [1, 2, 3, 4], 1)
    assert fed.failures[1] == []


def test_two_unmask_requests_at_once_reveal_only_once(tmp_path: Path) -> None:
    """A coordinator sending the same unmask request twice in parallel gets one reveal: each
    step holds the run's lock from reading the state to recording the reveal."""
    fed = Federation(tmp_path, n=3, rounds=1)
    held: list[Message] = []

    def hold_node_1(rnd: int, stage: str, msg: Message) -> bool:
        if stage == wire.STAGE_UNMASK and msg.metadata.dst_node_id == 1:
            held.append(msg)
            return False
        return True

    fed.grid.on_request = hold_node_1
    assert_exact(fed.round(1), [1, 2, 3], 1)  # node 1 silent: t = 2 others reveal
    outcomes: list[str] = []

    def reveal() -> None:
        try:
            hospital(held[0], fed.grid.contexts[1])
            outcomes.append("revealed")
        except SecAggError as err:
            outcomes.append(type(err).__name__)

    threads = [threading.Thread(target=reveal) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["ReplayError", "revealed"]


def test_the_same_weights_in_another_encoding_are_the_same_training_input() -> None:
    """A lying coordinator re-encoding the weights (another dtype, order, -0.0) to get a
    second masked update from the same input: the digest is of the weights as loaded."""
    import torch
    from flwr.app import RecordDict

    from fedmri.proto import weights

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.bias[0] = 0.0
    state = model.state_dict()

    def loaded(sent: dict[str, torch.Tensor]) -> str:
        target = torch.nn.Linear(3, 2)
        target.load_state_dict(weights.unpack(RecordDict(weights.pack(sent))))
        return secure_client.training_input(target.state_dict(), 5)

    first = loaded(state)
    assert loaded({k: v.double() for k, v in state.items()}) == first
    assert loaded(dict(reversed(list(state.items())))) == first
    negative = {k: v.clone() for k, v in state.items()}
    negative["bias"][0] = -0.0
    assert loaded(negative) == first
    assert secure_client.training_input(state, 6) != first  # another seed
    moved = {k: v + 1e-3 for k, v in state.items()}
    assert loaded(moved) != first  # other weights


def test_a_round_whose_unmask_was_withheld_gets_no_fresh_keys(tmp_path: Path) -> None:
    """The coordinator keeps hospital-1 out of round 1's unmask (the others reveal for it),
    then sets round 1 up again: hospital-1, which masked an update for it, refuses new keys,
    the others refuse as they revealed; no second masked copy of any update."""
    fed = Federation(tmp_path, n=3, rounds=1)
    fed.grid.on_request = lambda rnd, stage, msg: not (
        stage == wire.STAGE_UNMASK and msg.metadata.dst_node_id == 1)
    assert_exact(fed.round(1), [1, 2, 3], 1)
    fed.grid.on_request = lambda rnd, stage, msg: True
    assert isinstance(fed.round(1), SecAggError)
    refusal = next(f for f in fed.failures[1] if "hospital hospital-1:" in f)
    assert "already masked an update" in refusal, fed.failures[1]
    assert fed.grid.stages(1)[wire.STAGE_MASK].count(1) == 1  # masked once, never again
