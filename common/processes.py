"""Starting and stopping the topology's processes without leaving orphans.

Flower's SuperLink and SuperNode start `flower-superexec` detached (own session), and that
in turn starts `flwr-serverapp` / `flwr-clientapp`. Killing the parent alone leaves them
running. The supervisor makes itself a child subreaper (Linux), so every descendant that
loses its parent is re-parented to us and stays findable, then stops whole trees: children
first, SIGTERM, a grace period, SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

log = logging.getLogger("fedmri.deploy")

PR_SET_CHILD_SUBREAPER = 36

# Flower phones home and may install packages unless told not to; every process we start
# gets these, and nothing leaves the machine but the run's own messages.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C (KeyboardInterrupt), so `finally` blocks and supervisors
    stop every process a command started."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
                  what: str = "process") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening "
                               f"on port {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f}s")


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    # Flower finds its helpers (flower-superexec, flwr-clientapp) on PATH: use our venv's.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"'{name}' not found; is flwr installed in this environment?")
    return found


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen[bytes]
    log_file: IO[bytes]


class Supervisor:
    """Owns every process it starts; `stop_all` (or leaving the `with`) stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Managed] = []
        self.subreaper = become_subreaper()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log_file = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(list(argv), stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env or flower_env(), cwd=cwd)
        self.procs.append(Managed(name, proc, log_file))
        log.info("event=process_started name=%s pid=%d", name, proc.pid)
        return proc

    def stop_all(self, grace_s: float = 10.0) -> None:
        self._stop(list(self.procs), grace_s)
        # Anything left is an orphan re-parented to us (we are its subreaper).
        _terminate([p for p in psutil.Process().children(recursive=True) if _is_flower(p)],
                   grace_s)

    def _stop(self, managed: list[Managed], grace_s: float) -> None:
        # Signal every tree at once: stopping them one by one costs each one's grace period.
        _terminate([p for m in managed for p in _tree(m.proc.pid)], grace_s)
        for m in managed:
            m.proc.wait()
            m.log_file.close()
            self.procs.remove(m)


def _tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants, descendants first."""
    try:
        root = psutil.Process(pid)
        return [*reversed(root.children(recursive=True)), root]
    except psutil.NoSuchProcess:
        return []


def _is_flower(proc: psutil.Process) -> bool:
    try:
        return any("flwr" in part or "flower" in part for part in proc.cmdline()[:2])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _terminate(procs: list[psutil.Process], grace_s: float) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)
