"""Runs the coordinator submits to its SuperLink: `fedmri run start|status|stop|fetch-model`.

Each run gets a folder runs/NAME (NAME: UTC start time) that the ServerApp writes its events,
checkpoints and global model into; run.json there records Flower's run id and the config.
The run's member list is the registry's members at submission (a copy in the run folder).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmri.common.checkpoint import save_json
from fedmri.common.config import RunConfig
from fedmri.proto import files
from fedmri.proto.events import (
    FINAL,
    Done,
    Event,
    EventTail,
    Failed,
    HospitalFailed,
    Resumed,
    RoundDone,
    RoundSkipped,
    Validated,
)
from fedmri.proto.run_config import ServerSettings
from fedmri.server.flower_app import FlowerApp, write_flower_app
from fedmri.server.home import CoordinatorHome

RUN_RECORD = "run.json"
MAX_RESUMES = 3  # a run that keeps dying is left for an operator


def start_run(home: CoordinatorHome, cfg: RunConfig, min_nodes: int | None,
              node_wait_s: float, round_timeout_s: float, stage_timeout_s: float,
              actor: str) -> dict[str, Any]:
    """Submit a run; `min_nodes` None waits for every member."""
    from fedmri.common.identity import save_pinned
    from fedmri.server import superlink
    from fedmri.server.registry import Registry

    home.require()
    if not home.status_file.exists():
        raise RuntimeError(f"the coordinator is not running (start it: fedmri server start "
                           f"--home {home.root})")
    registry = Registry(home.registry)
    members = registry.members()
    if cfg.secure and len(members) < 2:
        registry.close()
        raise ValueError(f"secure aggregation needs at least 2 enrolled hospitals; "
                         f"{len(members)} enrolled")
    min_nodes = min_nodes or max(1, len(members))
    name = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = home.runs / name
    out.mkdir(parents=True)
    # The run keeps its own copy: later enrollments do not change a running federation.
    pinned = out / files.PINNED_KEYS
    save_pinned(pinned, members)
    settings = ServerSettings(out_dir=out, min_nodes=min_nodes, node_wait_s=node_wait_s,
                              round_timeout_s=round_timeout_s, stage_timeout_s=stage_timeout_s,
                              pinned_keys=pinned)
    app_dir = out / "app"
    write_flower_app(app_dir, FlowerApp("fedmri.server.app:app", "fedmri.client.app:app",
                                        {**cfg.to_dict(), **settings.to_run_config()}))
    try:
        answer = superlink.flwr(home, "run", str(app_dir), "fedmri", cwd=out)
    except RuntimeError as err:
        registry.audit(actor, "run_start", name, "failed", str(err))
        registry.close()
        raise
    record = {"run": name, "run_id": str(answer.get("run-id", "")), "started": time.time(),
              "config": cfg.to_dict(), "members": sorted(members), "min_nodes": min_nodes}
    save_json(out / RUN_RECORD, record)
    registry.audit(actor, "run_start", name, "ok",
                   f"flower run {record['run_id']}, rounds {cfg.rounds}, secure {cfg.secure}, "
                   f"members {','.join(sorted(members))}")
    registry.close()
    return record


def _run_dirs(home: CoordinatorHome) -> list[Path]:
    if not home.runs.exists():
        return []
    return sorted(p for p in home.runs.iterdir() if (p / RUN_RECORD).exists())


def summarize(folder: Path) -> dict[str, Any]:
    record = json.loads((folder / RUN_RECORD).read_text())
    state, last_round, metrics, problems = "running", 0, [], []
    for event in EventTail(folder / files.EVENTS).read():
        if isinstance(event, RoundDone):
            last_round = event.round
            metrics.append({"round": event.round, "seconds": event.seconds,
                            "hospitals": event.hospitals, "train_loss": event.train_loss})
        elif isinstance(event, (HospitalFailed, RoundSkipped)):
            problems.append(f"round {event.round}: {event.reason}")
        elif isinstance(event, Done):
            state = "finished"
        elif isinstance(event, Failed):
            state, problems = "failed", [*problems, event.error]
    if (folder / "stopped").exists() and state == "running":
        state = "stopped"
    return {"run": record["run"], "run_id": record["run_id"], "state": state,
            "round": last_round, "rounds": record["config"]["rounds"],
            "secure": record["config"]["secure"], "metrics": metrics, "problems": problems[-10:],
            "model": str(folder / files.GLOBAL_MODEL)
            if (folder / files.GLOBAL_MODEL).exists() else None}


def run_summaries(home: CoordinatorHome) -> list[dict[str, Any]]:
    return [summarize(folder) for folder in _run_dirs(home)]


def find_run(home: CoordinatorHome, name: str | None) -> Path:
    """A run's folder by its name or Flower run id; the latest run without one."""
    runs = _run_dirs(home)
    if not runs:
        raise FileNotFoundError(f"no runs in {home.runs} (start one: fedmri run start)")
    if name is None:
        return runs[-1]
    for folder in runs:
        record = json.loads((folder / RUN_RECORD).read_text())
        if name in (record["run"], record["run_id"], *record.get("previous_run_ids", [])):
            return folder
    raise FileNotFoundError(f"no run named {name!r} in {home.runs}")


def resume_interrupted(home: CoordinatorHome, registry: Any) -> list[str]:
    """Submit again every run the coordinator was stopped in the middle of (`fedmri server
    start` calls it once its SuperLink is up): Flower does not restart a run's ServerApp,
    ours resumes after the run's last checkpointed round (same folder, same config). The
    run gets a new Flower run id; hospitals approve it as any run (policy or operator)."""
    from fedmri.server import superlink

    resumed = []
    for folder in _run_dirs(home):
        try:
            summary = summarize(folder)
            record = json.loads((folder / RUN_RECORD).read_text())
            old = str(record["run_id"])
        except (OSError, ValueError, KeyError, TypeError) as err:  # one bad folder, not all
            registry.audit("server", "run_resume", folder.name, "failed", f"unreadable: {err}")
            continue
        if summary["state"] != "running":
            continue
        if len(record.get("previous_run_ids", [])) >= MAX_RESUMES:
            registry.audit("server", "run_resume", folder.name, "failed",
                           f"resumed {MAX_RESUMES} times already; not again (run stop it)")
            continue
        with contextlib.suppress(RuntimeError):  # Flower may have ended it already
            superlink.flwr(home, "stop", old, "fedmri")  # its ServerApp is gone
        try:
            answer = superlink.flwr(home, "run", str(folder / "app"), "fedmri", cwd=folder)
        except RuntimeError as err:
            registry.audit("server", "run_resume", folder.name, "failed", str(err))
            continue
        record["previous_run_ids"] = [*record.get("previous_run_ids", []), old]
        record["run_id"] = str(answer.get("run-id", ""))
        save_json(folder / RUN_RECORD, record)
        registry.audit("server", "run_resume", folder.name, "ok",
                       f"flower run {record['run_id']} (was {old}), after round "
                       f"{summary['round']}")
        resumed.append(folder.name)
    return resumed


def stop_run(home: CoordinatorHome, name: str | None, actor: str) -> dict[str, Any]:
    from fedmri.server import superlink
    from fedmri.server.registry import Registry

    folder = find_run(home, name)
    record = json.loads((folder / RUN_RECORD).read_text())
    superlink.flwr(home, "stop", record["run_id"], "fedmri")
    (folder / "stopped").write_text(f"{time.time()}\n")
    registry = Registry(home.registry)
    registry.audit(actor, "run_stop", record["run"], "ok", f"flower run {record['run_id']}")
    registry.close()
    return summarize(folder)


def describe(event: Event) -> str | None:
    """One human line for a ServerApp event, or None for events not worth a line."""
    if isinstance(event, RoundDone):
        losses = " ".join(f"{h}={v:.3f}" for h, v in event.train_loss.items())
        return (f"round {event.round}: {event.seconds:.1f}s, "
                f"{event.hospitals} hospitals, train loss {losses}")
    if isinstance(event, Validated):
        return f"round {event.round}: global validation Dice {event.global_val_dice:.3f}"
    if isinstance(event, (HospitalFailed, RoundSkipped)):
        return f"{event.NAME}: round {event.round}: {event.reason}"
    if isinstance(event, Failed):
        return f"{event.NAME}: {event.error}"
    if isinstance(event, Resumed):
        return f"{event.NAME} after round {event.round}"
    return None


def wait_for_end(folder: Path, on_event: Callable[[Event], None],
                 timeout_s: float | None = None,
                 trouble: Callable[[], str | None] | None = None) -> Event:
    """Follow a run's events until its last one (Done or Failed); raise if the run is
    stopped, `timeout_s` passes first, or `trouble` (the caller's own check, e.g. of the
    processes it started) names a problem and no last event follows within a second."""
    tail = EventTail(folder / files.EVENTS)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        problem = trouble() if trouble else None
        if problem:
            time.sleep(1.0)  # the run's last events may land just after
        for event in tail.read():
            on_event(event)
            if isinstance(event, FINAL):
                return event
        if problem:
            raise RuntimeError(problem)
        if (folder / "stopped").exists():
            raise RuntimeError(f"run {folder.name} was stopped")
        # A stopped coordinator is waited for: started again, it resumes the run.
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {folder.name} did not end within {timeout_s:.0f}s")
        time.sleep(0.5)


def fetch_model(home: CoordinatorHome, name: str | None, out: Path) -> Path:
    folder = find_run(home, name)
    model = folder / files.GLOBAL_MODEL
    if not model.exists():
        raise FileNotFoundError(f"run {folder.name} has no global model yet (no round "
                                "finished)")
    out = out / files.GLOBAL_MODEL if out.is_dir() else out
    shutil.copyfile(model, out)
    return out


class RoundAuditor:
    """Copies each run's round results and failures into the audit log as they happen
    (`fedmri server start` calls `poll` about twice a second)."""

    def __init__(self, home: CoordinatorHome) -> None:
        self.home = home
        self.tails: dict[Path, EventTail] = {}
        for folder in _run_dirs(home):  # already audited by an earlier `server start`
            tail = self.tails[folder] = EventTail(folder / files.EVENTS)
            events = folder / files.EVENTS
            tail.offset = events.stat().st_size if events.exists() else 0

    def poll(self, registry: Any) -> None:
        for folder in _run_dirs(self.home):
            tail = self.tails.setdefault(folder, EventTail(folder / files.EVENTS))
            for event in tail.read():
                if isinstance(event, RoundDone):
                    registry.audit("serverapp", "round", folder.name, "ok",
                                   f"round {event.round}: {event.hospitals} hospitals, "
                                   f"{event.failures} failures, {event.seconds:.1f}s")
                elif isinstance(event, (HospitalFailed, RoundSkipped)):
                    registry.audit("serverapp", event.NAME, folder.name, "error",
                                   f"round {event.round}: {event.reason}")
                elif isinstance(event, Done):
                    registry.audit("serverapp", "run_done", folder.name, "ok",
                                   f"{event.rounds} rounds")
                elif isinstance(event, Failed):
                    registry.audit("serverapp", "run_failed", folder.name, "error", event.error)
