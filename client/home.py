"""The hospital's home folder (`fedmri client --home DIR`): keys, config and state.

    client.toml      hospital name, coordinator, data folder, threads, device, policies
    node.key         Flower SuperNode authentication key (EC P-384, OpenSSH), 0600
    node.pub         its public half, sent at enrollment
    identity.pem     secure-aggregation identity key (Ed25519), 0600
    ca.pem           the coordinator's CA, checked against its fingerprint at enrollment
    members.json     the members this hospital accepted (name -> identity key): the only
                     hospitals it runs secure aggregation with
    announced.json   members the coordinator announced that are not accepted yet
    policy.toml      which runs this hospital joins (fedmri.client.run_approval.RunPolicy)
    runs/            runs seen (RUN.json) and approved (RUN.approved)
    state/           secure-aggregation round state between messages
    executor.secret  what the executor claims the SuperNode's tasks with (new at each start)
    logs/            the SuperNode's log
Back up the keys, client.toml and members.json: without them the hospital must enroll again.
The data folder is only ever read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedmri.proto import files
from fedmri.proto.typed_config import (
    NAME,
    NON_NEGATIVE,
    POSITIVE,
    read_toml,
    setting,
    toml_text,
)

DEFAULT_HOME = Path("~/.fedmri/client")
MEMBER_POLICIES = ("manual", "accept-all")


@dataclass(frozen=True)
class HospitalSettings:
    hospital: str = setting("hospital", help="this hospital's enrolled name", check=NAME)
    superlink: str = setting("superlink", help="the coordinator's SuperLink, HOST:PORT")
    enrollment: str = setting("enrollment", help="the coordinator's enrollment service")
    data: Path = setting("data", help="the hospital's DICOM folder (only read)")
    federation: str = setting("federation", "", "the coordinator's federation name")
    threads: int = setting("threads", 0, "torch CPU threads; 0: torch's default",
                           NON_NEGATIVE)
    tp: int = setting("tp", 1, "ranks that split each volume in depth", POSITIVE)
    executor: bool = setting(
        "executor", True, "run messages in fedmri's long-lived executor (only the installed "
        "ClientApp); false: Flower's per-message processes, which run the ClientApp a run "
        "names (comparison and fallback only)")
    member_policy: str = setting(
        "member-policy", "manual", "manual: new members wait for `fedmri client accept`; "
        "accept-all: every announced member is accepted (demos only)",
        ("manual or accept-all", lambda v: v in MEMBER_POLICIES))


@dataclass(frozen=True)
class HospitalHome:
    root: Path

    @classmethod
    def at(cls, home: Path | None) -> HospitalHome:
        return cls(Path(os.path.expanduser(home or DEFAULT_HOME)).resolve())

    @property
    def config(self) -> Path:
        return self.root / "client.toml"

    @property
    def node_key(self) -> Path:
        return self.root / "node.key"

    @property
    def node_pub(self) -> Path:
        return self.root / "node.pub"

    @property
    def identity_key(self) -> Path:
        return self.root / files.IDENTITY_KEY

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def members(self) -> Path:
        return self.root / "members.json"

    @property
    def announced(self) -> Path:
        return self.root / "announced.json"

    @property
    def policy(self) -> Path:
        return self.root / "policy.toml"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def executor_secret(self) -> Path:
        return self.root / "executor.secret"  # SuperNode <-> executor task claims, 0600

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"  # written by `client start`

    def require(self) -> HospitalSettings:
        return read_toml(HospitalSettings, self.config,
                         f"run `fedmri client init --home {self.root} ...` first")

    def write_config(self, settings: HospitalSettings) -> None:
        from fedmri.common.checkpoint import atomic_write

        text = toml_text(settings).encode()
        atomic_write(self.config, lambda fh: fh.write(text), mode=0o644)
