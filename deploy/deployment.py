"""One Flower App run as a bare deployment on 127.0.0.1: what the benches and the fault tests
use to run their own Flower Apps (Flower's per-message ClientApp processes; `fedmri simulate`
runs the operators' commands instead, fedmri.deploy.topology).

`run_deployment` makes the TLS files (a CA per run) and the FLWR_HOME config, writes a Flower
App whose components are installed fedmri modules, starts one `flower-superlink` and one
`flower-supernode` per node config, submits the run with `flwr run --stream`, calls `poll`
until it reports an outcome, lets the run's app processes exit, and stops every process it
started, on success, failure, timeout or Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil

from fedmri.common.processes import (
    Supervisor,
    executable,
    flower_env,
    free_port,
    interrupt_on_sigterm,
    wait_for_port,
)
from fedmri.proto.node_config import NodeConfig
from fedmri.server.flower_app import FlowerApp, write_flower_app

T = TypeVar("T")

APP_PROCESSES = ("flwr-serverapp", "flwr-clientapp")


@dataclass
class Deployment:
    home: Path  # FLWR_HOME: config.toml, tls/, app/
    workdir: Path  # where `flwr run` runs
    nodes: Sequence[NodeConfig]  # one SuperNode each, named by its hospital
    tls: bool = True  # TLS between SuperNodes, `flwr run` and the SuperLink (a per-run CA)
    timeout_s: float = 3600.0
    log_dir: Path | None = None  # default: workdir/logs
    app_exit_grace_s: float = 15.0  # for app processes still exiting after the outcome


def write_flower_home(home: Path, port: int, ca_cert: Path | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    security = (f"root-certificates = {json.dumps(str(ca_cert))}" if ca_cert
                else "insecure = true")
    (home / "config.toml").write_text(f"""\
[superlink]
default = "fedmri"

[superlink.fedmri]
address = "127.0.0.1:{port}"
{security}
""")


def _tls_args(tls: bool, folder: Path) -> tuple[list[str], list[str], Path | None]:
    """Command-line flags for the SuperLink and the SuperNodes, and the CA to trust."""
    if not tls:
        return ["--insecure"], ["--insecure"], None
    from fedmri.common.tls import make_tls_files

    files = make_tls_files(folder)
    link = ["--ssl-certfile", str(files.server_cert), "--ssl-keyfile", str(files.server_key),
            "--ssl-ca-certfile", str(files.ca_cert)]
    return link, ["--root-certificates", str(files.ca_cert)], files.ca_cert


def _app_processes_running() -> bool:
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and any(
                    name in part for part in proc.cmdline()[:2] for name in APP_PROCESSES):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return False


def _wait_for_app_processes(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _app_processes_running() and time.monotonic() < deadline:
        time.sleep(0.2)


def run_deployment(dep: Deployment, app: FlowerApp, poll: Callable[[], T | None]) -> T:
    """Run `app` on a fresh local deployment; return the first non-None `poll()`.

    `poll` is called about twice a second; once `flwr run` has exited it gets one more
    chance a second later (the ServerApp may write its last words just after), then the run
    counts as failed.
    """
    log_dir = dep.log_dir or dep.workdir / "logs"
    port = free_port()
    link_tls, node_tls, ca_cert = _tls_args(dep.tls, dep.home / "tls")
    write_flower_home(dep.home, port, ca_cert)
    write_flower_app(dep.home / "app", app)
    env = flower_env({"FLWR_HOME": str(dep.home)})
    with Supervisor(log_dir) as sup:
        link = sup.start("superlink", [executable("flower-superlink"), *link_tls,
                                       "--disable-runtime-dependency-installation",
                                       "--port", str(port)], env=env)
        wait_for_port(port, 60, link, "flower-superlink")
        for node in dep.nodes:
            sup.start(f"supernode-{node.hospital}", [
                executable("flower-supernode"), *node_tls,
                "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                "--node-config", node.to_node_config_arg()], env=env)
        runner = sup.start("flwr-run", [executable("flwr"), "run", str(dep.home / "app"),
                                        "fedmri", "--stream"], env=env, cwd=dep.workdir)
        deadline = time.monotonic() + dep.timeout_s
        while (outcome := poll()) is None:
            if runner.poll() is not None:
                time.sleep(1.0)
                if (outcome := poll()) is not None:
                    break
                raise RuntimeError(f"the run ended without finishing (flwr run exit code "
                                   f"{runner.returncode}); see {log_dir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run did not finish within {dep.timeout_s:.0f}s")
            time.sleep(0.5)
        # Let the ServerApp and the last ClientApps exit on their own (they record their
        # last state) before the SuperNodes and the SuperLink are stopped.
        _wait_for_app_processes(dep.app_exit_grace_s)
    return outcome


def run_guarded(prog: str, work: Callable[[], T]) -> tuple[T | None, int]:
    """A command's deployment work: (result, 0), or (None, exit code) once it said why.

    SIGTERM and Ctrl-C stop every started process (130); a run that failed, timed out or was
    misconfigured prints one line naming the cause (1).
    """
    interrupt_on_sigterm()
    # A shell starts background jobs with SIGINT ignored; Ctrl-C must still stop the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return work(), 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; every process it started has been stopped",
              file=sys.stderr)
        return None, 130
    except (RuntimeError, TimeoutError, ValueError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return None, 1
