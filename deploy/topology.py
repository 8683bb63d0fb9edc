"""The federation's topology and the operators' commands that build it, in one place.

`Topology` says what a federation is (a coordinator, its hospitals, how they enroll and
which runs they join) as the command lines of `fedmri server`, `fedmri client` and
`fedmri run`: deploy/compose.yaml is generated from it (fedmri.deploy.compose) and
`fedmri simulate` runs it as local processes (`LocalFederation`), so both run the same
commands with the same flags; only paths and host names differ.

`LocalFederation` runs a coordinator and hospitals on this machine with their own homes under
one folder, exactly as on separate hosts (127.0.0.1 for the hosts): what `fedmri simulate`,
the daemon tests and `fedmri bench executor` use. Every process started is stopped on leaving
the `with` block.
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


@dataclass(frozen=True)
class Hospital:
    name: str
    tp: int = 1  # ranks splitting each volume in depth
    threads: int = 0  # torch CPU threads; 0: torch's default
    executor: bool = True  # False: Flower's per-message processes (comparison only)


@dataclass(frozen=True)
class Topology:
    """A coordinator and its hospitals as command lines (the arguments after `fedmri`).
    Paths are as each side sees them: container paths in Compose, real ones here."""

    federation: str
    hospitals: tuple[Hospital, ...] = ()
    run_flags: tuple[str, ...] = ()  # `fedmri run start`: the run config and timeouts
    member_policy: str = "accept-all"  # a simulation's hospitals accept each other
    approve_runs: str = "policy"  # ... and join the runs their policy allows
    allow_plain: bool = False  # the policy also allows runs without secure aggregation

    def server_init(self, home: str, host: str, port: int, enroll_port: int,
                    bind: str) -> list[str]:
        return ["server", "--home", home, "init", "--name", self.federation, "--host", host,
                "--port", str(port), "--enroll-port", str(enroll_port), "--bind", bind]

    def token(self, home: str, hospital: str, ticket: str) -> list[str]:
        return ["server", "--home", home, "token", hospital, "--out", ticket]

    def server_start(self, home: str) -> list[str]:
        return ["server", "--home", home, "start"]

    def client_init(self, home: str, hospital: Hospital, ticket: str | None,
                    data: str) -> list[str]:
        """Without a ticket the caller adds --coordinator, --name, --token, --ca-fingerprint."""
        return ["client", "--home", home, "init", *(["--ticket", ticket] if ticket else []),
                "--data", data,
                "--member-policy", self.member_policy, "--approve-runs", self.approve_runs,
                "--threads", str(hospital.threads), "--tp", str(hospital.tp),
                *(["--allow-plain"] if self.allow_plain else []),
                *([] if hospital.executor else ["--per-message-processes"])]

    def client_start(self, home: str) -> list[str]:
        return ["client", "--home", home, "start"]

    def run_start(self, home: str) -> list[str]:
        return ["run", "--home", home, "start", "--wait", *self.run_flags]

    def run_report(self, home: str, out: str, test_data: str) -> list[str]:
        return ["run", "--home", home, "report", "--out", out, "--test-data", test_data]


class CommandFailed(RuntimeError):
    pass


def fedmri(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDMRI, *args], capture_output=True, text=True, env=flower_env(),
                          timeout=timeout, check=False)


def ok(*args: str, timeout: float = 180) -> str:
    done = fedmri(*args, timeout=timeout)
    if done.returncode != 0:
        raise CommandFailed(f"fedmri {' '.join(args[:4])} ... exited {done.returncode}: "
                            f"{done.stderr.strip()[-1500:]}")
    return done.stdout


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float = 60,
             every_s: float = 0.5) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class LocalFederation:
    root: Path
    data: Path  # a cohort: one folder per hospital
    # The federation; without hospitals the caller enrolls and starts them one by one.
    topo: Topology = Topology("local")
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

    def ticket(self, hospital: str) -> Path:
        return self.root / "tickets" / f"{hospital}.json"

    def init_server(self) -> None:
        out = ok(*self.topo.server_init(str(self.server), "127.0.0.1", free_port(),
                                        free_port(), "127.0.0.1"))
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
        self.start("server", *self.topo.server_start(str(self.server)))
        wait_for("the coordinator to start", lambda: (self.server / "status.json").exists())

    def token(self, hospital: str, *extra: str) -> str:
        """A token for `hospital`, written to its ticket file."""
        from fedmri.proto.ticket import Ticket

        ok(*self.topo.token(str(self.server), hospital, str(self.ticket(hospital))), *extra)
        token = Ticket.read(self.ticket(hospital)).token
        self.tokens.append(token)
        return token

    def enroll_hospital(self, hospital: str, *extra: str, home: str | None = None,
                        token: str | None = None, fingerprint: str | None = None,
                        data: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`fedmri client init` with the flags given here and in `extra`: a token and
        fingerprint given here go on the command line; else a fresh ticket is used."""
        spec = next((h for h in self.topo.hospitals if h.name == hospital), Hospital(hospital))
        flags = bool(token or fingerprint)
        if not flags:
            self.token(hospital)
        args = self.topo.client_init(str(self.root / (home or hospital)), spec,
                                     None if flags else str(self.ticket(hospital)),
                                     str(data or self.data / hospital))
        if flags:
            args += ["--coordinator", self.enroll, "--name", hospital,
                     "--token", token or self.token(hospital),
                     "--ca-fingerprint", fingerprint or self.fingerprint]
        return fedmri(*args, *extra)

    def start_hospital(self, hospital: str, home: str | None = None) -> None:
        self.start(home or hospital, *self.topo.client_start(str(self.root / (home or hospital))))

    def up(self, wait_online: bool = True) -> None:
        """The whole topology: the coordinator, then each hospital enrolled and started (a
        run started at once waits for them itself: `fedmri run start --node-wait`)."""
        from concurrent.futures import ThreadPoolExecutor

        self.init_server()
        self.start_server()
        names = [h.name for h in self.topo.hospitals]
        with ThreadPoolExecutor(max(1, len(names))) as pool:  # as separate hosts would
            for name, done in zip(names, pool.map(self.enroll_hospital, names), strict=True):
                if done.returncode != 0:
                    raise CommandFailed(f"enrolling {name} failed: "
                                        f"{done.stderr.strip()[-1500:]}")
        for name in names:
            self.start_hospital(name)
        if wait_online:
            self.wait_online(len(self.topo.hospitals))

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
