"""Plain FedAvg: the example-weighted mean of the hospitals' weights."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from flwr.app import Message, MessageType, RecordDict

from fedmri.proto import weights, wire
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


def _check_layout(hospital: str, state: dict[str, torch.Tensor],
                  expected: dict[str, torch.Tensor]) -> None:
    """The hospital's weights must have the global model's keys, shapes and dtypes, and be
    finite: anything else would break or poison the mean beyond that hospital's weight."""
    if list(state) != list(expected):
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise ValueError(f"hospital {hospital} returned another model layout (extra "
                         f"{extra[:3]}, missing {missing[:3]})")
    for key, value in state.items():
        want = expected[key]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise ValueError(f"hospital {hospital}: {key} is {value.dtype} {tuple(value.shape)}"
                             f", the model has {want.dtype} {tuple(want.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"hospital {hospital}: {key} holds NaN or infinite values")


def read_reply(reply: Message, expected: dict[str, torch.Tensor] | None) -> Reply:
    """A hospital's evaluate reply, or with `expected` (the global state) its train reply; a
    malformed one is a ValueError saying what."""
    content = reply.content
    try:
        hospital = str(content.config_records[wire.INFO][wire.INFO_HOSPITAL])
    except KeyError as err:
        raise ValueError("reply does not name its hospital") from err
    item = Reply(hospital, metrics_of(reply))
    if expected is not None:
        if not weights.has_weights(content):
            raise ValueError(f"hospital {hospital} returned no weights")
        if wire.NUM_EXAMPLES not in item.metrics:
            raise ValueError(f"hospital {hospital} did not report its number of examples")
        try:
            item.state = weights.unpack(content)
        except ValueError as err:
            raise ValueError(f"hospital {hospital}: {err}") from err
        _check_layout(hospital, item.state, expected)
        item.upload_bytes = payload_bytes(content)
    return item


def collect(exchange: Exchange, messages: list[Message], timeout_s: float,
            expected: dict[str, torch.Tensor] | None) -> list[Reply]:
    """The readable replies, sorted by hospital (so float sums do not depend on arrival
    order). A malformed reply, a node claiming a name other than the one it is known by, or a
    second node claiming a hospital already heard from, fails that node."""
    replies: dict[str, Reply] = {}
    for reply in exchange.send(messages, timeout_s):
        node = reply.metadata.src_node_id
        try:
            item = read_reply(reply, expected)
            known = exchange.names.get(node)
            if known is not None and known != item.hospital:
                raise ValueError(f"node known as {known} names itself {item.hospital}")
            if item.hospital in replies:
                raise ValueError(f"{item.hospital} already answered from another node")
        except ValueError as err:
            exchange.fail(node, f"reply rejected: {err}")
            continue
        exchange.names[node] = item.hospital
        replies[item.hospital] = item
    return [replies[h] for h in sorted(replies)]


class PlainFedAvg:
    """Every hospital sends its weights; the server averages them (it sees each one)."""

    def __init__(self, round_timeout_s: float) -> None:
        self.round_timeout_s = round_timeout_s

    def run(self, exchange: Exchange, nodes: list[int], content: RecordDict,
            global_state: dict[str, torch.Tensor]) -> RoundOutcome:
        messages = [exchange.message(RecordDict(dict(content.items())), n, MessageType.TRAIN)
                    for n in nodes]
        outcome = RoundOutcome(replies=collect(exchange, messages, self.round_timeout_s,
                                               global_state))
        started = time.perf_counter()
        try:
            outcome.new_state = weighted_average(
                [(r.state, r.metrics[wire.NUM_EXAMPLES]) for r in outcome.replies if r.state])
        except ValueError as err:
            outcome.skipped = f"{err}; global model unchanged"
        outcome.aggregate_seconds = time.perf_counter() - started
        return outcome
