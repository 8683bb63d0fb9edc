"""The coordinator's round loop (Federation) with plain and secure FedAvg behind one interface,
driven through the in-process loopback Grid against hospitals that answer as the ClientApp
does (their training replaced by a known update, so the aggregate can be checked exactly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import LoopbackGrid
from fake_hospital import Hospitals, delta, val_dice, weight
from flwr.app import (
    Context,
    RecordDict,
)

from fedmri.common.config import RunConfig
from fedmri.deploy.enrollment import enroll_hospitals, enrolled_node
from fedmri.proto import files
from fedmri.proto.events import (
    Done,
    Event,
    HospitalExcluded,
    HospitalFailed,
    RoundDone,
    RoundSkipped,
    Validated,
)
from fedmri.proto.run_config import ServerSettings
from fedmri.server.federation import Federation

pytestmark = pytest.mark.usefixtures("serverapp_identity")
HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]


def federation(tmp_path: Path, secure: bool, rounds: int = 2,
               hospitals_: list[str] = HOSPITALS) -> tuple[Federation, Hospitals, list[Event]]:
    pinned = enroll_hospitals(tmp_path / "nodes", hospitals_)
    contexts = {i: Context(run_id=7, node_id=i, node_config=enrolled_node(
        tmp_path / "nodes", h, pinned).to_node_config(), state=RecordDict(), run_config={})
        for i, h in enumerate(hospitals_, 1)}
    hospitals = Hospitals()
    events: list[Event] = []
    cfg = RunConfig(size=16, rounds=rounds, secure=secure, secure_max_weight=100)
    settings = ServerSettings(out_dir=tmp_path / "out", min_nodes=len(hospitals_), node_wait_s=1.0,
                              pinned_keys=pinned)
    return (Federation(LoopbackGrid(contexts, hospitals), cfg, settings, "7", events.append),
            hospitals, events)


def mean_delta(nodes: list[int], rnd: int) -> float:
    return sum(weight(n) * delta(n, rnd) for n in nodes) / sum(weight(n) for n in nodes)


def assert_moved(fed: Federation, start: dict[str, torch.Tensor], by: float, tol: float) -> None:
    for key, value in fed.global_state.items():
        if value.is_floating_point():
            assert torch.allclose(value.double(), start[key].double() + by, atol=tol), key


@pytest.mark.parametrize("secure", [False, True])
def test_rounds_give_the_weighted_mean_and_the_same_record(tmp_path: Path, secure: bool) -> None:
    fed, _, events = federation(tmp_path, secure)
    start = {k: v.clone() for k, v in fed.global_state.items()}
    history = fed.run()
    tol = 1e-4 if secure else 1e-6  # quantization, or float32 rounding
    assert_moved(fed, start, mean_delta([1, 2, 3], 1) + mean_delta([1, 2, 3], 2), tol)
    assert [r.round for r in history] == [1, 2]
    expected_dice = sum(2 * val_dice(n) for n in (1, 2, 3)) / 6
    for record in history:
        assert sorted(record.hospitals) == HOSPITALS and record.failures == []
        assert [record.hospitals[h].num_examples for h in HOSPITALS] == [3, 5, 7]
        assert record.global_val_dice == pytest.approx(expected_dice)  # eval-first, then final
        assert record.bytes_up > 0 and record.bytes_down > 0
    assert [type(e) for e in events if isinstance(e, (RoundDone, Done))] == \
        [RoundDone, RoundDone, Done]
    assert sum(isinstance(e, Validated) for e in events) == 2
    assert (fed.settings.out_dir / files.SERVER_STATE).exists()
    assert (fed.settings.out_dir / files.GLOBAL_MODEL).exists()


@pytest.mark.parametrize("secure", [False, True])
def test_a_crashing_hospital_is_named_and_the_round_goes_on(tmp_path: Path,
                                                           secure: bool) -> None:
    fed, hospitals, events = federation(tmp_path, secure, rounds=1)
    hospitals.broken = {2}
    start = {k: v.clone() for k, v in fed.global_state.items()}
    fed.run()
    assert_moved(fed, start, mean_delta([1, 3], 1), 1e-4 if secure else 1e-6)
    failed = [e.reason for e in events if isinstance(e, HospitalFailed)]
    assert failed and all("hospital-2 crashed" in r for r in failed), failed
    assert sorted(fed.history[0].hospitals) == ["hospital-1", "hospital-3"]
    assert fed.history[0].failures == failed[:1]  # the next one is the final evaluation


def test_a_reply_that_names_no_hospital_is_rejected_not_fatal(tmp_path: Path) -> None:
    fed, hospitals, events = federation(tmp_path, secure=False, rounds=1)
    hospitals.nameless = {1}
    fed.run()
    assert any("node 1" in e.reason and "does not name its hospital" in e.reason
               for e in events if isinstance(e, HospitalFailed))
    assert sorted(fed.history[0].hospitals) == ["hospital-2", "hospital-3"]


@pytest.mark.parametrize("secure", [False, True])
def test_a_round_without_updates_is_skipped_and_keeps_the_model(tmp_path: Path,
                                                                secure: bool) -> None:
    fed, hospitals, events = federation(tmp_path, secure, rounds=1)
    hospitals.broken = {1, 2, 3}
    start = {k: v.clone() for k, v in fed.global_state.items()}
    fed.run()
    assert_moved(fed, start, 0.0, 0.0)
    skipped = [e for e in events if isinstance(e, RoundSkipped)]
    assert len(skipped) == 1 and "global model unchanged" in skipped[0].reason
    assert len(fed.history[0].failures) >= 3


def test_a_hospital_advertising_a_low_order_key_is_excluded(tmp_path: Path) -> None:
    """Its (validly signed) key is refused at advertise; it is named and excluded, and both
    rounds complete with the other three."""
    fed, _, events = federation(tmp_path, secure=True,
                                hospitals_=[*HOSPITALS, "faulty-low-order-key"])
    start = {k: v.clone() for k, v in fed.global_state.items()}
    fed.run()
    excluded = [e for e in events if isinstance(e, HospitalExcluded)]
    assert [(e.round, e.hospital) for e in excluded] == [(1, "faulty-low-order-key")]
    assert "low-order" in excluded[0].reason
    assert [e.round for e in events if isinstance(e, RoundDone)] == [1, 2]
    assert_moved(fed, start, mean_delta([1, 2, 3], 1) + mean_delta([1, 2, 3], 2), 1e-4)


def _three_node_grid(kind: type[LoopbackGrid], handle: object = None) -> LoopbackGrid:
    """A loopback grid of `kind` over nodes 1-3 that answer each message with an empty
    reply (or as `handle` does)."""
    from flwr.app import Context, Message, RecordDict

    contexts = {n: Context(run_id=7, node_id=n, node_config={}, state=RecordDict(),
                           run_config={}) for n in (1, 2, 3)}
    return kind(contexts, handle or (lambda msg, ctx: Message(RecordDict(), reply_to=msg)))


def test_a_reply_stuck_in_its_upload_holds_no_other_reply() -> None:
    """Flower pulls the objects of a reply whose sender died mid-upload for minutes: the
    exchange pulls each reply on its own, so the others arrive at once and the stuck one is
    a named failure at the deadline, not minutes later."""
    import threading
    import time

    from flwr.app import MessageType, RecordDict

    from fedmri.server.exchange import Exchange

    released = threading.Event()

    class StuckUpload(LoopbackGrid):
        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            got = list(super().pull_messages(message_ids))
            if any(r.metadata.src_node_id == 2 for r in got):
                released.wait(60)  # node 2's objects never complete
            return got

    grid = _three_node_grid(StuckUpload)
    failed: list[object] = []
    exchange = Exchange(grid, 1, failed.append, {2: "hospital-2"})
    started = time.monotonic()
    replies = exchange.send([exchange.message(RecordDict(), n, MessageType.QUERY)
                             for n in (1, 2, 3)], timeout_s=1.0)
    released.set()
    assert time.monotonic() - started < 3.0
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 3]
    assert exchange.failures == ["hospital-2: no reply within 1s"]


def test_a_reply_that_cannot_be_pulled_fails_that_hospital_alone() -> None:
    """A hospital uploads objects Flower cannot inflate: pulling its reply raises; that
    hospital is a named failure, the others' replies count, the round goes on."""
    from flwr.app import MessageType, RecordDict

    from fedmri.server.exchange import Exchange

    class MalformedUpload(LoopbackGrid):
        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            got = list(super().pull_messages(message_ids))
            if any(r.metadata.src_node_id == 3 for r in got):
                raise ValueError("Expecting value: line 1 column 1 (char 0)")
            return got

    grid = _three_node_grid(MalformedUpload)
    exchange = Exchange(grid, 1, lambda event: None, {3: "hospital-3"})
    replies = exchange.send([exchange.message(RecordDict(), n, MessageType.QUERY)
                             for n in (1, 2, 3)], timeout_s=5.0)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert exchange.failures == ["hospital-3: its reply could not be read (ValueError: "
                                 "Expecting value: line 1 column 1 (char 0))"]


def test_an_error_reply_from_the_superlink_names_the_hospital_asked() -> None:
    """Flower answers for a node that left with an error reply from the SuperLink (another
    source node): the failure names the hospital the message went to."""
    from flwr.app import Error, Message, MessageType, RecordDict

    from fedmri.server.exchange import Exchange

    def superlink_answers_for_2(msg: Message, ctx: object) -> Message:
        if msg.metadata.dst_node_id != 2:
            return Message(RecordDict(), reply_to=msg)
        reply = Message(Error(0, "Node Unavailable"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = 1  # as the SuperLink's replies carry
        return reply

    grid = _three_node_grid(LoopbackGrid, superlink_answers_for_2)
    exchange = Exchange(grid, 1, lambda event: None, {1: "hospital-1", 2: "hospital-2"})
    replies = exchange.send([exchange.message(RecordDict(), n, MessageType.QUERY)
                             for n in (1, 2, 3)], timeout_s=5.0)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 3]
    assert exchange.failures == ["hospital-2: Node Unavailable"]
