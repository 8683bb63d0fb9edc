"""Plain FedAvg: the example-weighted mean of the hospitals' weights."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from flwr.app import Message, MessageType, RecordDict

from fedmri.proto import wire
from fedmri.server.exchange import Exchange, Reply, RoundOutcome, metrics_of, payload_bytes


def weighted_average(states: Sequence[tuple[dict[str, torch.Tensor], float]]
                     ) -> dict[str, torch.Tensor]:
    """Mean of state dicts weighted by their example counts, accumulated in float64.

    Integer buffers (counters) are not averaged: the first state's value is kept.
    """
    if not states:
        raise ValueError("nothing to average: no hospital returned weights")
    total = float(sum(weight for _, weight in states))
    if total <= 0:
        raise ValueError(f"the summed example count is {total}; every hospital reported none")
    keys = list(states[0][0])
    for state, _ in states[1:]:
        if list(state) != keys:
            raise ValueError("hospitals returned different model layouts; check the run config")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][0][key]
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in states:
            acc += state[key].to(torch.float64) * (weight / total)
        out[key] = acc.to(first.dtype)
    return out


def read_reply(reply: Message, with_state: bool) -> Reply:
    """A hospital's train or evaluate reply; a malformed one is a ValueError saying what."""
    content = reply.content
    try:
        hospital = str(content.config_records[wire.INFO][wire.INFO_HOSPITAL])
    except KeyError as err:
        raise ValueError("reply does not name its hospital") from err
    item = Reply(hospital, metrics_of(reply))
    if with_state:
        if wire.ARRAYS not in content.array_records:
            raise ValueError(f"hospital {hospital} returned no weights")
        if wire.NUM_EXAMPLES not in item.metrics:
            raise ValueError(f"hospital {hospital} did not report its number of examples")
        item.state = content.array_records[wire.ARRAYS].to_torch_state_dict()
        item.upload_bytes = payload_bytes(content)
    return item


def collect(exchange: Exchange, messages: list[Message], timeout_s: float,
            with_state: bool) -> list[Reply]:
    """The readable replies, sorted by hospital (so float sums do not depend on arrival
    order); a malformed reply fails its node."""
    replies = []
    for reply in exchange.send(messages, timeout_s):
        try:
            item = read_reply(reply, with_state)
        except ValueError as err:
            exchange.fail(reply.metadata.src_node_id, f"reply rejected: {err}")
            continue
        exchange.names[reply.metadata.src_node_id] = item.hospital
        replies.append(item)
    return sorted(replies, key=lambda r: r.hospital)


class PlainFedAvg:
    """Every hospital sends its weights; the server averages them (it sees each one)."""

    def __init__(self, round_timeout_s: float) -> None:
        self.round_timeout_s = round_timeout_s

    def run(self, exchange: Exchange, nodes: list[int], content: RecordDict,
            global_state: dict[str, torch.Tensor]) -> RoundOutcome:
        messages = [exchange.message(RecordDict(dict(content.items())), n, MessageType.TRAIN)
                    for n in nodes]
        outcome = RoundOutcome(replies=collect(exchange, messages, self.round_timeout_s, True))
        started = time.perf_counter()
        try:
            outcome.new_state = weighted_average(
                [(r.state, r.metrics[wire.NUM_EXAMPLES]) for r in outcome.replies if r.state])
        except ValueError as err:
            outcome.skipped = f"{err}; global model unchanged"
        outcome.aggregate_seconds = time.perf_counter() - started
        return outcome
