"""Flower's SuperNode, answering within a tenth of a second while a run is busy.

flower-supernode pulls one message from the SuperLink, then the message's objects (the
weights: retried after 1 s, 2 s, ... up to 10 s while the coordinator is still uploading them),
waits for its reply (checking every 0.5 s), pushes it, and pulls again; when nothing is waiting
it sleeps 3 s. A secure round is four exchanges in a row (keys, train, consistency, unmask), so
these fixed waits cost seconds per round that no hospital computes anything in.
`python -m fedmri.client.supernode ARGS` (ARGS: flower-supernode's) runs the same SuperNode
with shorter waits: objects are retried after `OBJECT_BACKOFF_S` (doubling to its cap), the
reply is checked for every `REPLY_POLL_S`, and within `BUSY_S` of the last message it pulls
every `BUSY_POLL_S`; idle, it keeps Flower's 3 s (no extra load on the SuperLink between runs).

This replaces three names in flwr's start_client_internal module (its `time`,
`_pull_and_store_message` and `pull_objects`): flwr is pinned (pyproject) and `patch` refuses
to run against a module that no longer has them, so a changed Flower fails loudly instead of
running slow.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

BUSY_S = 120.0  # a run's exchanges follow each other within seconds; a new run waits <= 3 s
BUSY_POLL_S = 0.1
REPLY_POLL_S = 0.05
OBJECT_BACKOFF_S = (0.05, 1.0)  # first retry, cap (Flower's: 1 s, 10 s)
OBJECT_TRIES = 5000  # at the 1 s cap as long as Flower's 500 tries at 10 s: about 83 min
FLOWER_IDLE_S, FLOWER_REPLY_S = 3, 0.5  # flwr 1.42's waits, as written in the module


class BusyClock:
    """The module's `time`: its fixed sleeps shortened while a run is busy."""

    def __init__(self, now: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._now, self._sleep = now, sleep
        self.last_message = float("-inf")

    def saw_message(self) -> None:
        self.last_message = self._now()

    def busy(self) -> bool:
        return self._now() - self.last_message < BUSY_S

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_S and self.busy():
            seconds = BUSY_POLL_S
        elif seconds == FLOWER_REPLY_S:
            seconds = REPLY_POLL_S  # waiting for a reply: a message is in hand
        self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:  # time.time, time.monotonic, ... unchanged
        return getattr(time, name)


def patch(module: ModuleType, clock: BusyClock) -> None:
    for name in ("time", "_pull_and_store_message", "pull_objects"):
        if not hasattr(module, name):
            raise RuntimeError(f"{module.__name__} has no {name!r}: this flwr is not the one "
                               "fedmri.client.supernode was written for (see pyproject's pin)")
    pull, pull_objects = module._pull_and_store_message, module.pull_objects

    def pull_and_note(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.saw_message()
        return run_id

    def pull_objects_sooner(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", OBJECT_BACKOFF_S[0])
        kwargs.setdefault("backoff_cap", OBJECT_BACKOFF_S[1])
        kwargs.setdefault("max_tries_per_object", OBJECT_TRIES)
        return pull_objects(*args, **kwargs)

    module.time = clock  # type: ignore[attr-defined]
    module._pull_and_store_message = pull_and_note  # type: ignore[attr-defined]
    module.pull_objects = pull_objects_sooner  # type: ignore[attr-defined]


def main() -> int:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    patch(start_client_internal, BusyClock())
    sys.argv[0] = "flower-supernode"  # its usage and logs name the tool it is
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
