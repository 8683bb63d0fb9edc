"""The coordinator's event log (`events.jsonl`): one JSON object per line, one per event.

The ServerApp writes events (`EventLog`); `fedmri simulate` and operators read them
(`EventTail`, `decode`). Each line is `{"time": unix seconds, "event": NAME, **fields}` where
NAME and the fields are those of one of the event classes below.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger("fedmri.events")


@dataclass(frozen=True)
class Started:
    NAME: ClassVar[str] = "started"
    rounds: int
    from_round: int


@dataclass(frozen=True)
class Resumed:
    NAME: ClassVar[str] = "resumed"
    round: int  # the last finished round


@dataclass(frozen=True)
class HospitalFailed:
    NAME: ClassVar[str] = "hospital_failed"
    round: int
    reason: str  # names the hospital (or node) and what went wrong


@dataclass(frozen=True)
class HospitalExcluded:
    NAME: ClassVar[str] = "hospital_excluded"
    round: int  # the round in which it sent malformed data; it takes no part after it
    hospital: str
    reason: str


@dataclass(frozen=True)
class RoundSkipped:
    NAME: ClassVar[str] = "round_skipped"
    round: int
    reason: str


@dataclass(frozen=True)
class SecureSum:
    NAME: ClassVar[str] = "secure_sum"
    round: int
    survivors: list[str]
    error_bound: float  # worst-case per-coordinate error of the dequantized mean


@dataclass(frozen=True)
class Validated:
    NAME: ClassVar[str] = "validated"
    round: int
    global_val_dice: float


@dataclass(frozen=True)
class RoundDone:
    NAME: ClassVar[str] = "round_done"
    round: int
    seconds: float
    hospitals: int
    failures: int
    train_loss: dict[str, float]


@dataclass(frozen=True)
class Done:
    NAME: ClassVar[str] = "done"
    rounds: int


@dataclass(frozen=True)
class Failed:
    NAME: ClassVar[str] = "failed"
    error: str
    trace: str = ""


Event = Started | Resumed | HospitalFailed | HospitalExcluded | RoundSkipped | SecureSum \
    | Validated | RoundDone | Done | Failed
EVENTS: dict[str, type[Event]] = {cls.NAME: cls for cls in (
    Started, Resumed, HospitalFailed, HospitalExcluded, RoundSkipped, SecureSum, Validated,
    RoundDone, Done, Failed)}
FINAL = (Done, Failed)  # the last event of a run


def encode(event: Event) -> dict[str, Any]:
    return {"event": event.NAME, **asdict(event)}


def decode(line: dict[str, Any]) -> Event:
    """The event of one parsed line; an unknown name or missing field is a ValueError."""
    cls = EVENTS.get(str(line.get("event")))
    if cls is None:
        raise ValueError(f"unknown event {line.get('event')!r} in the event log")
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in line.items() if k in names})
    except TypeError as err:
        raise ValueError(f"malformed {cls.NAME} event {line}: {err}") from err


class EventLog:
    """Appends events to `path` (and to the log), one line each, as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, event: Event) -> None:
        line = json.dumps({"time": round(time.time(), 3), **encode(event)})
        log.info(line)
        with self.path.open("a") as fh:
            fh.write(line + "\n")


class EventTail:
    """Reads the events appended to `path` since the last call. A line that is not a known
    event is logged and skipped (the reader never stops on one); a file that shrank (a new
    run) is read again from its start."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[Event]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            if fh.seek(0, 2) < self.offset:
                self.offset = 0
            fh.seek(self.offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        out = []
        for raw in complete.splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw.decode())
                if not isinstance(line, dict):
                    raise ValueError(f"not an object: {line!r}")
                out.append(decode(line))
            except (UnicodeDecodeError, ValueError, TypeError) as err:
                log.warning("event=bad_event_line path=%s error=%s", self.path, err)
        return out
