"""The coordinator's home folder (`fedmri server|run --home DIR`): keys, config and state.

    server.toml      name, hosts, ports (CoordinatorSettings)
    tls/ca.pem       the federation's CA (hospitals pin its fingerprint); ca.key 0600
    tls/server.pem   the SuperLink's and enrollment service's certificate; server.key 0600
    registry.db      tokens (hashed), hospitals, append-only audit log (fedmri.server.registry)
    superlink.db     Flower's SuperLink state: registered node keys, runs
    superexec.secret what the ServerApp executor claims tasks with (0600, new at each start)
    flwr/            FLWR_HOME of the `flwr` commands fedmri runs (config.toml)
    runs/RUN/        each run's output: events, checkpoints, global model, report
    logs/            the SuperLink's log
Back up everything but logs/ (runs/ holds the models).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedmri.proto.typed_config import NAME, POSITIVE, read_toml, setting, toml_text

DEFAULT_HOME = Path("~/.fedmri/server")


@dataclass(frozen=True)
class CoordinatorSettings:
    name: str = setting("name", help="the federation's name, shown to hospitals", check=NAME)
    hosts: str = setting("hosts", "127.0.0.1",
                         "comma-separated names/addresses hospitals reach the server by")
    port: int = setting("port", 9092, "the SuperLink's port (Fleet and Control API)", POSITIVE)
    enroll_port: int = setting("enroll-port", 9095, "the enrollment service's port", POSITIVE)
    bind: str = setting("bind", "0.0.0.0", "the address both services listen on")


@dataclass(frozen=True)
class CoordinatorHome:
    root: Path

    @classmethod
    def at(cls, home: Path | None) -> CoordinatorHome:
        return cls(Path(os.path.expanduser(home or DEFAULT_HOME)).resolve())

    @property
    def config(self) -> Path:
        return self.root / "server.toml"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def registry(self) -> Path:
        return self.root / "registry.db"

    @property
    def superlink_db(self) -> Path:
        return self.root / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def superexec_secret(self) -> Path:
        return self.root / "superexec.secret"  # ServerApp task claims; new at each start

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"  # written by `server start`: pid, ports, started

    def require(self) -> CoordinatorSettings:
        return read_toml(CoordinatorSettings, self.config,
                         f"run `fedmri server init --home {self.root} ...` first")

    def write_config(self, settings: CoordinatorSettings) -> None:
        from fedmri.common.checkpoint import atomic_write

        text = toml_text(settings).encode()
        atomic_write(self.config, lambda fh: fh.write(text), mode=0o644)

    def write_flwr_config(self, settings: CoordinatorSettings) -> None:
        """The `flwr` CLI's connection to our SuperLink, over TLS with our CA."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(f"""\
[superlink]
default = "fedmri"

[superlink.fedmri]
address = "127.0.0.1:{settings.port}"
root-certificates = {json.dumps(str(self.tls / "ca.pem"))}
""")
