"""A hospital's secure-aggregation state on local disk, kept between Flower messages.

Flower starts a fresh ClientApp process per message, so a round's protocol state (ephemeral
private keys, its own shares) lives in a file per (run, round) in the node's state folder,
written atomically, owner-only (0600), the folder 0700, both enforced on every write. It is
deleted after the round's unmask step; files of rounds that never finished go when a later
round of the run makes its keys, and any older than `MAX_AGE_S` go at the next write.

Each step holds an exclusive lock on the run (`locked`) from reading the state to writing it:
two messages handled at once (a coordinator may send them) cannot both sign a survivor set or
both reveal from the same state.

The folder also keeps, durably, the last round of each run this hospital revealed for: a
setup or unmask request for that round or an earlier one is refused, so a coordinator cannot
re-run a round and difference two aggregates of the same hospital. And, across runs, the
training inputs (a digest of the global weights and the training seed) it has masked an update
for: the same input in another run or round is refused, so a resumed, restarted or repeated run
cannot get a second aggregate holding the same update either (see `claim_input`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from fedmri.common.checkpoint import write_private
from fedmri.common.secagg import ReplayError

MAX_AGE_S = 7 * 24 * 3600.0
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_STATE = re.compile(r"secagg-(?P<run>.+)-(?P<round>\d+)\.state")


def check_run_id(run_id: str) -> str:
    """A run id safe to put in a file name (no '/', '*', '[', '..', no leading '.')."""
    if not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ValueError(f"run id {run_id!r} is not a plain name (letters, digits, '.', '_', "
                         "'-'; at most 128); refusing to use it in a file name")
    return run_id


class RoundStateStore:
    """The state folder of one hospital's SuperNode."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _ready(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)  # also when it existed with looser permissions
        return self.folder

    @contextlib.contextmanager
    def _flock(self, name: str) -> Iterator[None]:
        self._ready()
        fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def locked(self, run_id: str) -> contextlib.AbstractContextManager[None]:
        """Hold the run's lock (an flock on a file beside the state) for one step."""
        return self._flock(f"secagg-{check_run_id(run_id)}.lock")

    def path(self, run_id: str, rnd: int) -> Path:
        return self.folder / f"secagg-{check_run_id(run_id)}-{int(rnd)}.state"

    def save(self, run_id: str, rnd: int, state: bytes) -> None:
        """Under `locked`, which made the folder (0700)."""
        write_private(self.path(run_id, rnd), state)
        self._drop_stale()

    def load(self, run_id: str, rnd: int, hospital: str) -> bytes:
        path = self.path(run_id, rnd)
        if not path.exists():
            raise ValueError(f"hospital {hospital}: no secure-aggregation state {path}; this "
                             "node did not take part in the round's earlier steps")
        return path.read_bytes()

    def drop(self, run_id: str, rnd: int) -> None:
        self.path(run_id, rnd).unlink(missing_ok=True)

    def drop_earlier(self, run_id: str, rnd: int) -> None:
        """Delete the run's round files before `rnd` (their keys are never used again)."""
        for path in self.folder.glob("secagg-*.state"):
            match = _STATE.fullmatch(path.name)
            if match and match["run"] == run_id and int(match["round"]) < rnd:
                path.unlink(missing_ok=True)

    def _drop_stale(self) -> None:
        cutoff = time.time() - MAX_AGE_S
        for path in self.folder.glob("secagg-*.state"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                continue

    # -- replay defence ----------------------------------------------------------------------
    def _last_path(self, run_id: str) -> Path:
        return self.folder / f"secagg-{check_run_id(run_id)}.last"

    def last_unmasked(self, run_id: str) -> int:
        path = self._last_path(run_id)
        if not path.exists():
            return 0
        try:
            return int(json.loads(path.read_text())["round"])
        except (ValueError, KeyError, TypeError) as err:
            # Unreadable means unknown: refuse everything rather than risk a re-run.
            raise ReplayError(f"the record of unmasked rounds {path} is unreadable ({err}); "
                              "refusing to take part until an operator checks it") from err

    def record_unmasked(self, run_id: str, rnd: int) -> None:
        """Under `locked`, which made the folder (0700)."""
        write_private(self._last_path(run_id), json.dumps({"round": int(rnd)}).encode())

    def refuse_replay(self, run_id: str, rnd: int, hospital: str, what: str) -> None:
        last = self.last_unmasked(run_id)
        if rnd <= last:
            raise ReplayError(
                f"hospital {hospital}: {what} for run {run_id!r} round {rnd}, but it already "
                f"revealed for round {last} of that run; refusing (a re-run round could be "
                "differenced against the first)")

    # -- training inputs, across runs ------------------------------------------------------
    # Others reveal a hospital's self-mask seed whenever the coordinator says it survived, so
    # once its masked update has left, the hospital cannot know whether that update was
    # unmasked: a second masked update from the same input (a round the coordinator lost in a
    # restart, re-ran in a new run, or resumed) is refused. What is lost is that one round: the
    # next round trains with another seed.
    def _inputs_path(self) -> Path:
        return self.folder / "secagg-inputs.json"

    def _inputs(self) -> dict[str, dict[str, object]]:
        path = self._inputs_path()
        if not path.exists():
            return {}
        try:
            used = json.loads(path.read_text())
            if not isinstance(used, dict) or not all(
                    isinstance(e, dict) and isinstance(e.get("run"), str)
                    and isinstance(e.get("round"), int) for e in used.values()):
                raise TypeError("not a mapping of inputs to their run and round")
            return used
        except (ValueError, TypeError, RecursionError) as err:
            raise ReplayError(f"the record of masked training inputs {path} is unreadable "
                              f"({err}); refusing to take part until an operator checks it"
                              ) from err

    def refuse_used_input(self, digest: str, run_id: str, rnd: int, hospital: str) -> None:
        """ReplayError if this input was masked for another run or round."""
        with self._flock("secagg-inputs.lock"):
            self._refuse(self._inputs(), digest, run_id, rnd, hospital)

    def claim_input(self, digest: str, run_id: str, rnd: int, hospital: str) -> None:
        """Record, durably and before the masked update leaves, that this input is masked
        for (run, round); ReplayError if it already was for another run or round."""
        with self._flock("secagg-inputs.lock"):
            used = self._inputs()
            self._refuse(used, digest, run_id, rnd, hospital)
            if digest not in used:
                used[digest] = {"run": run_id, "round": int(rnd), "at": round(time.time(), 3)}
                write_private(self._inputs_path(), json.dumps(used).encode())

    def refuse_masked_round(self, run_id: str, rnd: int, hospital: str) -> None:
        """ReplayError if this hospital already masked an update for (run, round)."""
        with self._flock("secagg-inputs.lock"):
            if any((e["run"], e["round"]) == (run_id, int(rnd))
                   for e in self._inputs().values()):
                raise ReplayError(
                    f"hospital {hospital}: a new setup for run {run_id!r} round {rnd}, for "
                    "which it already masked an update; refusing (fresh keys would give the "
                    "coordinator a second masked copy of that update)")

    @staticmethod
    def _refuse(used: dict[str, dict[str, object]], digest: str, run_id: str, rnd: int,
                hospital: str) -> None:
        first = used.get(digest)
        if first is not None and (first.get("run"), first.get("round")) != (run_id, int(rnd)):
            raise ReplayError(
                f"hospital {hospital}: run {run_id!r} round {rnd} asks for an update trained "
                f"from the same global weights and seed as run {first.get('run')!r} round "
                f"{first.get('round')}, which this hospital already masked an update for; "
                "refusing (two aggregates holding the same update could be differenced). "
                "The round is lost; the next one trains with another seed")
