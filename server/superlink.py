"""Flower's SuperLink as the coordinator runs it, and its node registrations.

The SuperLink runs with TLS, SuperNode authentication (only registered node keys connect),
its state in a database file (a restart keeps registrations and runs) and runtime dependency
installation off. Node keys are registered and unregistered through Flower's own `flwr
supernode` commands, run against the coordinator's FLWR_HOME.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from fedmri.common.processes import executable, flower_env
from fedmri.server.home import CoordinatorHome, CoordinatorSettings

FLWR_TIMEOUT_S = 60.0


def superlink_argv(home: CoordinatorHome, settings: CoordinatorSettings) -> list[str]:
    """The SuperLink in process-isolation mode: its ServerApp tasks go only to a claimant
    holding the secret (superexec_argv). Its Runtime API shares the public port with the Fleet
    API, so in Flower's default mode any host reaching the port could claim a run's ServerApp
    task and drive the run."""
    tls = home.tls
    return [executable("flower-superlink"),
            "--ssl-certfile", str(tls / "server.pem"), "--ssl-keyfile", str(tls / "server.key"),
            "--ssl-ca-certfile", str(tls / "ca.pem"),
            "--enable-supernode-auth", "--database", str(home.superlink_db),
            "--disable-runtime-dependency-installation",
            "--isolation", "process", "--superexec-auth-secret-file", str(home.superexec_secret),
            "--host", settings.bind, "--port", str(settings.port)]


def superexec_argv(home: CoordinatorHome, settings: CoordinatorSettings) -> list[str]:
    """Flower's executor of ServerApp tasks, claiming them with the secret, over TLS."""
    return [executable("flower-superexec"), "--runtime-api-address",
            f"127.0.0.1:{settings.port}", "--root-certificates", str(home.tls / "ca.pem"),
            "--superexec-auth-secret-file", str(home.superexec_secret)]


def flwr(home: CoordinatorHome, *args: str, cwd: Path | None = None) -> dict[str, Any]:
    """Run `flwr ARGS --format json` against our SuperLink; its JSON answer, or a
    RuntimeError with Flower's own message."""
    done = subprocess.run([executable("flwr"), *args, "--format", "json"], capture_output=True,
                          text=True, timeout=FLWR_TIMEOUT_S, cwd=cwd, check=False,
                          env=flower_env({"FLWR_HOME": str(home.flwr_home)}))
    answer = _json_answer(done.stdout)
    if done.returncode != 0 or answer.get("success") is False:
        reason = answer.get("error-message") or (done.stderr or done.stdout).strip()[-500:]
        raise RuntimeError(f"flwr {' '.join(args[:2])} failed: {reason}")
    return answer


def _json_answer(stdout: str) -> dict[str, Any]:
    """Flower's JSON answer: the whole output, or its last JSON line after log lines."""
    for text in (stdout, *reversed(stdout.splitlines())):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def register_node(home: CoordinatorHome, ssh_public_key: bytes, name: str) -> int:
    """Register a SuperNode authentication key (OpenSSH format); Flower's node id."""
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "node.pub"
        key_file.write_bytes(ssh_public_key)
        answer = flwr(home, "supernode", "register", str(key_file), "fedmri", "--name", name)
    return int(answer["node-id"])


def unregister_node(home: CoordinatorHome, node_id: int) -> None:
    flwr(home, "supernode", "unregister", str(node_id), "fedmri")


def list_nodes(home: CoordinatorHome) -> list[dict[str, Any]]:
    answer = flwr(home, "supernode", "list", "fedmri")
    nodes: list[dict[str, Any]] = answer.get("nodes", [])
    return nodes
