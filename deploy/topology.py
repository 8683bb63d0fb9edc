"""A coordinator and hospitals on this machine, set up only through the operators' commands.

`fedmri server init/start/token`, `fedmri client init/start` and `fedmri run start` run as
real processes with their own homes under one folder, exactly as on separate hosts (with
127.0.0.1 for the hosts): what the daemon tests and `fedmri bench executor` use. Every process
started is stopped on leaving the `with` block.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedmri.common.processes import flower_env, free_port

T = TypeVar("T")
FEDMRI = [sys.executable, "-m", "fedmri.common.cli"]


class CommandFailed(RuntimeError):
    pass


def fedmri(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDMRI, *args], capture_output=True, text=True, env=flower_env(),
                          timeout=timeout, check=False)


def ok(*args: str) -> str:
    done = fedmri(*args)
    if done.returncode != 0:
        raise CommandFailed(f"fedmri {' '.join(args[:4])} ... exited {done.returncode}: "
                            f"{done.stderr.strip()[-1500:]}")
    return done.stdout


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float = 60) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class LocalFederation:
    root: Path
    data: Path  # a cohort: one folder per hospital
    name: str = "local"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    fingerprint: str = ""
    enroll: str = ""

    @property
    def server(self) -> Path:
        return self.root / "coordinator"

    def home(self, hospital: str) -> Path:
        return self.root / hospital

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def init_server(self) -> None:
        out = ok("server", "--home", str(self.server), "init", "--name", self.name, "--host",
                 "127.0.0.1", "--port", str(free_port()), "--enroll-port", str(free_port()),
                 "--bind", "127.0.0.1")
        self.fingerprint = _field(r"CA fingerprint: (\S+)", out)
        port = _field(r"enroll-port = (\d+)", (self.server / "server.toml").read_text())
        self.enroll = f"127.0.0.1:{port}"

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.out").open("wb")
        proc = subprocess.Popen([*FEDMRI, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=flower_env())
        self.procs[name] = proc
        return proc

    def start_server(self) -> None:
        self.start("server", "server", "--home", str(self.server), "start")
        wait_for("the coordinator to start", lambda: (self.server / "status.json").exists())

    def token(self, hospital: str, *extra: str) -> str:
        token = _field(r"^token:\s+(\S+)", ok("server", "--home", str(self.server), "token",
                                              hospital, *extra))
        self.tokens.append(token)
        return token

    def enroll_hospital(self, hospital: str, *extra: str, home: str | None = None,
                        token: str | None = None, fingerprint: str | None = None,
                        data: Path | None = None) -> subprocess.CompletedProcess[str]:
        return fedmri("client", "--home", str(self.root / (home or hospital)), "init",
                      "--coordinator", self.enroll, "--name", hospital,
                      "--token", token or self.token(hospital),
                      "--ca-fingerprint", fingerprint or self.fingerprint,
                      "--data", str(data or self.data / hospital), *extra)

    def start_hospital(self, hospital: str, home: str | None = None) -> None:
        self.start(home or hospital, "client", "--home", str(self.root / (home or hospital)),
                   "start")

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(ok("server", "--home", str(self.server), "status",
                                                "--json"))
        return result

    def wait_online(self, count: int, timeout_s: float = 90) -> None:
        wait_for(f"{count} SuperNodes online", lambda: sum(
            h["status"] == "online" for h in self.status()["hospitals"]) >= count, timeout_s)

    def run(self, *flags: str) -> str:
        """Start a run; its Flower run id."""
        out = ok("run", "--home", str(self.server), "start", *flags)
        return _field(r"Flower run (\d+)", out)

    def run_status(self, run: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(ok("run", "--home", str(self.server), "status",
                                                *([run] if run else []), "--json"))
        return result

    def wait_run(self, run: str | None = None, timeout_s: float = 600) -> dict[str, Any]:
        return wait_for("the run to end", lambda: (s := self.run_status(run))["state"] !=
                        "running" and s, timeout_s)

    def stop(self, name: str, timeout_s: float = 30) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):  # hospitals before the coordinator
            self.stop(name)


def _field(pattern: str, text: str) -> str:
    found = re.search(pattern, text, re.M)
    if not found:
        raise CommandFailed(f"unexpected output (no {pattern!r}): {text[-500:]}")
    return found.group(1)
