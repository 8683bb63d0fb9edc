"""`fedmri client start`: the hospital daemon.

Runs Flower's SuperNode with TLS (the coordinator's CA), node authentication (node.key) and
the node config of this home, in the foreground, in process-isolation mode, and fedmri's
long-lived executor that takes its tasks (fedmri.client.executor: only the installed ClientApp
runs, warm). A SuperNode or executor that exits is restarted (both) with
backoff (1 s doubling to 60 s, reset after 5 minutes up); the member list is refreshed from the
coordinator every 15 s (fedmri.client.members). SIGTERM or Ctrl-C stops everything it
started. One structured log line per event; status.json says what runs now.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from fedmri.client.executor import executor_argv, supernode_args
from fedmri.client.home import HospitalHome, HospitalSettings
from fedmri.common.checkpoint import save_json, write_private
from fedmri.common.processes import (
    Supervisor,
    flower_env,
    free_port,
    interrupt_on_sigterm,
)
from fedmri.proto.node_config import NodeConfig

log = logging.getLogger("fedmri.client")

BACKOFF_MAX_S = 60.0
STABLE_S = 300.0
MEMBERS_EVERY_S = 15.0  # a new member shows within seconds; the request is cheap


def node_config(home: HospitalHome, settings: HospitalSettings) -> NodeConfig:
    return NodeConfig(hospital=settings.hospital, data_path=settings.data,
                      threads=settings.threads, tp=settings.tp,
                      identity_key=home.identity_key, pinned_keys=home.members,
                      state_dir=home.state, runs_dir=home.runs, run_policy=home.policy)


def supernode_argv(home: HospitalHome, settings: HospitalSettings, runtime_port: int
                   ) -> list[str]:
    isolation = supernode_args(home.executor_secret) if settings.executor else []
    # Flower's SuperNode, with shorter waits while a run is busy (fedmri.client.supernode).
    return [sys.executable, "-m", "fedmri.client.supernode",
            "--root-certificates", str(home.ca_cert),
            "--superlink", settings.superlink,
            "--auth-supernode-private-key", str(home.node_key),
            "--node-config", node_config(home, settings).to_node_config_arg(),
            *isolation, "--host", "127.0.0.1", "--port", str(runtime_port)]



def data_problem(folder: Path) -> str | None:
    """Why the data folder cannot feed training, as far as a quick look tells (the full
    scan is `fedmri client check`); None when it holds files to read."""
    def fail(err: OSError) -> None:
        raise err

    try:
        if not folder.is_dir():
            return f"data folder {folder} is missing or not a folder"
        for _root, _dirs, names in os.walk(folder, onerror=fail):
            if names:
                return None
        return f"data folder {folder} holds no files"
    except OSError as err:
        return f"data folder {folder} cannot be read: {err}"


class Daemon:
    def __init__(self, home: HospitalHome) -> None:
        self.home = home
        self.settings = home.require()
        self.restarts = 0
        self.started = time.time()
        self.data_problem: str | None = None

    def _status(self, state: str, **extra: Any) -> None:
        save_json(self.home.status_file, {
            "pid": os.getpid(), "hospital": self.settings.hospital, "state": state,
            "started": self.started, "restarts": self.restarts, "updated": time.time(),
            "data_problem": self.data_problem, **extra})

    def refresh_members(self) -> None:
        from fedmri.client import members
        from fedmri.client.enroll import EnrollmentError, fetch_members

        try:
            offered = fetch_members(self.settings.enrollment, self.home.ca_cert.read_bytes(),
                                    self.settings.hospital, self.home.identity_key)
        except EnrollmentError as err:
            log.warning("event=members_refresh_failed hospital=%s error=%r",
                        self.settings.hospital, str(err))
            return
        members.update(self.home, self.settings, offered)

    def _refresh_due(self, due: float) -> float:
        """Refresh the member list if `due` has passed; when the next refresh is due."""
        if time.monotonic() < due:
            return due
        self.refresh_members()
        return time.monotonic() + MEMBERS_EVERY_S

    def run(self) -> int:
        interrupt_on_sigterm()
        env = flower_env({"FLWR_HOME": str(self.home.root / "flwr")})
        # Unusable data does not stop the daemon: it stays connected, and each round it is
        # asked to train in, its ClientApp answers with the reason (the round goes on).
        self.data_problem = data_problem(self.settings.data)
        if not self.settings.executor:
            log.warning("event=unsafe_executor_off hospital=%s: executor = false: Flower's "
                        "per-message processes run the ClientApp code of the coordinator's "
                        "run bundle; for comparisons only", self.settings.hospital)
        if self.data_problem:
            log.warning("event=data_unusable hospital=%s problem=%r", self.settings.hospital,
                        self.data_problem)
        backoff = 1.0
        next_members = 0.0
        try:
            with Supervisor(self.home.logs) as sup:
                while True:
                    next_members = self._refresh_due(next_members)
                    port = free_port()
                    if self.settings.executor:
                        write_private(self.home.executor_secret, secrets.token_bytes(32))
                    node = sup.start("supernode", supernode_argv(self.home, self.settings, port),
                                     env=env)
                    # The executor takes the SuperNode's tasks; without it, Flower's
                    # per-message processes do (settings.executor = false).
                    executor = node
                    if self.settings.executor:
                        executor = sup.start(
                            "executor", executor_argv(port, self.home.executor_secret), env=env)
                    up_since = time.monotonic()
                    log.info("event=supernode_started hospital=%s pid=%d superlink=%s "
                             "executor=%s", self.settings.hospital, node.pid,
                             self.settings.superlink, executor.pid)
                    self._status("running", supernode_pid=node.pid, executor_pid=executor.pid)
                    while node.poll() is None and executor.poll() is None:
                        next_members = self._refresh_due(next_members)
                        time.sleep(0.5)
                    sup.stop_all()
                    if time.monotonic() - up_since > STABLE_S:
                        backoff = 1.0
                    self.restarts += 1
                    log.warning("event=supernode_exited hospital=%s code=%s executor_code=%s "
                                "restart_in=%.0fs logs=%s", self.settings.hospital,
                                node.returncode, executor.returncode, backoff, self.home.logs)
                    self._status("restarting", last_exit=node.returncode)
                    time.sleep(backoff)
                    backoff = min(BACKOFF_MAX_S, backoff * 2)
        except KeyboardInterrupt:
            log.info("event=daemon_stopped hospital=%s", self.settings.hospital)
            return 0
        finally:
            self.home.status_file.unlink(missing_ok=True)


def start(home: Path | None) -> int:
    return Daemon(HospitalHome.at(home)).run()
