"""The supervisor stops whole process trees, detached grandchildren included."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil

from fedmri.common.processes import FLOWER_ENV, Supervisor, flower_env, free_port, wait_for_port

# A parent that starts a detached grandchild in its own session (as flower-supernode starts
# flower-superexec), writes its pid, then ignores SIGTERM for a while like a slow shutdown.
PARENT = """
import subprocess, sys, time, signal
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                         start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
signal.signal(signal.SIGTERM, lambda *a: None)
time.sleep(300)
"""


def test_stop_all_kills_detached_grandchildren(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    with Supervisor(tmp_path / "logs") as sup:
        parent = sup.start("parent", [sys.executable, "-c", PARENT, str(pid_file)])
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the parent never started its child"
            time.sleep(0.1)
        grandchild = int(pid_file.read_text())
        assert psutil.pid_exists(grandchild)
        started = time.monotonic()
    # Leaving the block stopped both: SIGTERM, then SIGKILL for the one that ignored it.
    assert parent.poll() is not None
    assert not psutil.pid_exists(grandchild) or \
        psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert time.monotonic() - started < 25
    assert (tmp_path / "logs" / "parent.log").exists()


def test_ports_and_environment() -> None:
    port = free_port()
    env = flower_env({"EXTRA": "1"})
    for key, value in FLOWER_ENV.items():
        assert env[key] == value
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    with Supervisor(Path("/tmp") / f"fedmri-test-{port}") as sup:
        server = sup.start("http", [sys.executable, "-m", "http.server", str(port),
                                    "--bind", "127.0.0.1"])
        wait_for_port(port, 30, server, "http.server")
    assert server.poll() is not None
