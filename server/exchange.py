"""One round's messages to the hospitals, and what every aggregation returns.

Plain and secure FedAvg send through the same `Exchange` (it names and records every hospital
that failed or did not answer) and return the same `RoundOutcome`, so the round loop
(fedmri.server.federation) only orchestrates and records.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedmri.proto import wire
from fedmri.proto.events import Event, HospitalFailed

POLL_S = (0.05, 1.0)  # the first and the longest wait between asking for replies

if TYPE_CHECKING:
    import torch

EventSink = Callable[[Event], None]
Arrivals = queue.SimpleQueue[tuple[str, "list[Message] | Exception"]]


@dataclass
class Reply:
    hospital: str
    metrics: dict[str, float]
    state: dict[str, torch.Tensor] | None = None  # plain FedAvg: the hospital's weights
    upload_bytes: int = 0


@dataclass
class RoundOutcome:
    replies: list[Reply] = field(default_factory=list)  # the hospitals in the aggregate
    new_state: dict[str, torch.Tensor] | None = None  # None: the model stays as it was
    skipped: str = ""  # why there is no new state
    aggregate_seconds: float = 0.0  # unmasking + dequantizing, or the weighted mean


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's arrays and config values: the measure of bytes_up/bytes_down."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for cfg in content.config_records.values():
        total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in cfg.values())
    return total


# What a hospital may report; anything else would poison the weighted mean or the records.
_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    wire.NUM_EXAMPLES: ("greater than 0", lambda v: v > 0),
    wire.NUM_VAL: ("0 or more", lambda v: v >= 0),
    wire.VAL_DICE: ("between 0 and 1", lambda v: 0.0 <= v <= 1.0),
    wire.TRAIN_SECONDS: ("0 or more", lambda v: v >= 0),
    wire.LOAD_SECONDS: ("0 or more", lambda v: v >= 0),
    wire.MESH_SETUP_SECONDS: ("0 or more", lambda v: v >= 0),
}


def metrics_of(reply: Message) -> dict[str, float]:
    """A reply's METRICS record as floats; a missing record, a non-number, a non-finite
    number or one out of its range is a ValueError naming the metric."""
    records = reply.content.metric_records
    if wire.METRICS not in records:
        raise ValueError("reply has no metrics record")
    out = {}
    for key, value in records[wire.METRICS].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError(f"metric {key!r} is not a finite number: {value!r}")
        if key in _RANGES and not _RANGES[key][1](float(value)):
            raise ValueError(f"metric {key!r} must be {_RANGES[key][0]}, got {value!r}")
        out[key] = float(value)
    return out


class Exchange:
    """Sends one round's messages and collects the replies. A hospital that answers with an
    error, or not in time, becomes a named failure (and a `hospital_failed` event), never an
    exception: the round goes on with the others."""

    def __init__(self, grid: Grid, rnd: int, emit: EventSink, names: dict[int, str]) -> None:
        self.grid, self.rnd, self.emit = grid, rnd, emit
        self.names = names  # node -> hospital, as far as known (shared across rounds)
        self.failures: list[str] = []
        self.bytes_down = 0

    def message(self, content: RecordDict, node: int, kind: str) -> Message:
        return Message(content, dst_node_id=node, message_type=kind, group_id=str(self.rnd))

    def send(self, messages: list[Message], timeout_s: float) -> list[Message]:
        """The replies without errors; every other message's node is failed."""
        self.bytes_down += sum(payload_bytes(m.content) for m in messages)
        replies, unreadable = self._send_and_receive(messages, timeout_s)
        # Replies are matched to what they answer (the push gave the messages their ids):
        # Flower's own error replies (a node that left) come from the SuperLink, not from
        # the hospital's node.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = {r.metadata.reply_to_message_id for r in replies}
        for m in messages:
            message_id = m.metadata.message_id
            if message_id in unreadable:
                self.fail(m.metadata.dst_node_id,
                          f"its reply could not be read ({unreadable[message_id]})")
            elif message_id not in answered:
                self.fail(m.metadata.dst_node_id, f"no reply within {timeout_s:.0f}s")
        good = []
        for reply in replies:
            if reply.has_error():
                self.fail(node_of.get(reply.metadata.reply_to_message_id,
                                      reply.metadata.src_node_id),
                          reply.error.reason or "error without reason")
            else:
                good.append(reply)
        return good

    def _send_and_receive(self, messages: list[Message], timeout_s: float
                          ) -> tuple[list[Message], dict[str, str]]:
        """Flower's Grid.send_and_receive, but asking for replies 50 ms after a change and at
        most a second apart, instead of every 3 s (a secure round has 3-4 exchanges), and for
        each reply on its own, in a thread: Flower keeps pulling the objects of a reply whose
        upload a dying node left unfinished for minutes, and that must not hold the others'
        replies past the deadline (the stuck pull ends in the background); a reply that
        cannot be pulled (a hospital's malformed objects) fails that message alone. Returns
        the replies and, by message id, why a reply could not be read.
        One small request per pending reply per poll: about N a second for N hospitals
        while they train, to the SuperLink on the same host."""
        pending = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + timeout_s
        arrived: Arrivals = queue.SimpleQueue()
        asking: set[str] = set()
        replies: list[Message] = []
        unreadable: dict[str, str] = {}
        wait = POLL_S[0]
        while pending:
            for message_id in pending - asking:
                asking.add(message_id)
                threading.Thread(target=self._pull, args=(message_id, arrived),
                                 daemon=True).start()
            got = 0
            for message_id, result in self._collect(arrived, asking,
                                                    min(wait, deadline - time.monotonic())):
                if isinstance(result, Exception):
                    unreadable[message_id] = f"{type(result).__name__}: {result}"[:300]
                    pending.discard(message_id)
                    continue
                replies += result
                got += len(result)
                pending -= {r.metadata.reply_to_message_id for r in result}
            if not pending or time.monotonic() >= deadline:
                break
            wait = POLL_S[0] if got else min(2 * wait, POLL_S[1])
        return replies, unreadable

    def _pull(self, message_id: str, arrived: Arrivals) -> None:
        try:
            arrived.put((message_id, list(self.grid.pull_messages([message_id]))))
        except Exception as err:  # noqa: BLE001 - that message fails, not the round
            arrived.put((message_id, err))

    @staticmethod
    def _collect(arrived: Arrivals, asking: set[str], wait_s: float
                 ) -> list[tuple[str, list[Message] | Exception]]:
        """The pulls that end within `wait_s`, once every pull asked has ended or the time
        is up; a pull that ended is asked again next time."""
        ended: list[tuple[str, list[Message] | Exception]] = []
        until = time.monotonic() + max(0.0, wait_s)
        while asking:
            try:
                message_id, result = arrived.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                break
            asking.discard(message_id)
            ended.append((message_id, result))
        time.sleep(max(0.0, until - time.monotonic()))
        return ended

    def fail(self, node: int, reason: str) -> None:
        text = f"{self.names.get(node, f'node {node}')}: {reason}"
        self.failures.append(text)
        self.emit(HospitalFailed(self.rnd, text))
