"""Shared test fixtures: an in-process Flower Grid that hands messages to hospital handlers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import pytest
from flwr.app import Context, Error, Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmri.proto import wire

Hook = Callable[[int, str, Message], bool]  # (round, stage, message) -> deliver it?
Handler = Callable[[Message, Context], Message]  # what a hospital's ClientApp does


def stage_of(msg: Message) -> str:
    """The secure-aggregation stage of a message, or its Flower message type."""
    records = msg.content.config_records if msg.has_content() else {}
    if wire.SECAGG in records:
        return str(records[wire.SECAGG][wire.SECAGG_STAGE])
    return msg.metadata.message_type


class LoopbackGrid(Grid):
    """Hands each pushed message to `handle` with its node's Context (what a SuperNode's
    ClientApp gets) and returns the replies when pulled, in process. `log` lists (round,
    node, stage, carries-next-setup) of every message sent; `on_request` / `on_reply` may
    alter a message in place, or return False to drop it. A handler's exception becomes an
    error reply, as Flower makes it."""

    def __init__(self, contexts: dict[int, Context], handle: Handler) -> None:
        self.contexts, self.handle = contexts, handle
        self.log: list[tuple[int, int, str, bool]] = []
        self.on_request: Hook = lambda rnd, stage, msg: True
        self.on_reply: Hook = lambda rnd, stage, msg: True
        self.pushed = 0
        self.replies: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message handled at once; its reply (if not dropped) waits for pull_messages."""
        ids = []
        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"loopback-{self.pushed}"  # as Flower does
            ids.append(msg.metadata.message_id)
            stage, rnd = stage_of(msg), int(msg.metadata.group_id)
            records = msg.content.config_records
            self.log.append((rnd, msg.metadata.dst_node_id, stage, stage == wire.STAGE_UNMASK
                             and wire.SECAGG_SETUP in records[wire.SECAGG]))
            if not self.on_request(rnd, stage, msg):
                continue
            try:
                reply = self.handle(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - Flower turns any into an error reply
                reply = Message(Error(0, f"{type(err).__name__}: {err}"), reply_to=msg)
            if self.on_reply(rnd, stage, reply):
                self.replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def stages(self, rnd: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for r, node, stage, _ in self.log:
            if r == rnd:
                out.setdefault(stage, []).append(node)
        return out

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)

    # Not used by the ServerApp's round code.
    def set_run(self, run: object) -> None:  # type: ignore[override]
        raise NotImplementedError

    @property
    def run(self) -> object:  # type: ignore[override]
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # type: ignore[override]
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *,  # type: ignore[override]
                         timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError  # the ServerApp pushes and pulls itself


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower sets these in a ServerApp process; Message() needs them."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.fixture(autouse=True, scope="session")
def _volume_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hospitals cache decoded volumes (FEDMRI_CACHE, else the system temp folder): keep
    the tests' caches, and those of the processes they start, inside pytest's tmp folder."""
    before = os.environ.get("FEDMRI_CACHE")
    os.environ["FEDMRI_CACHE"] = str(tmp_path_factory.mktemp("volume-cache"))
    yield
    if before is None:
        del os.environ["FEDMRI_CACHE"]
    else:
        os.environ["FEDMRI_CACHE"] = before
