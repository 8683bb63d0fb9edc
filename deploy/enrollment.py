"""Enrollment as `simulate` and the benchmarks do it: the coordinator makes every hospital's
identity key for the run. A deployment enrolls hospitals with keys they made themselves,
sending only the public half."""

from __future__ import annotations

from pathlib import Path

from fedmri.common.identity import create_identity, save_pinned
from fedmri.proto import files
from fedmri.proto.node_config import NodeConfig


def enroll_hospitals(folder: Path, hospitals: list[str]) -> Path:
    """A fresh identity key per hospital (`folder/<hospital>/identity.pem`) and the
    coordinator's pinned set of their public keys (`folder/pinned-keys.json`, returned)."""
    pinned = {h: create_identity(folder / h / files.IDENTITY_KEY) for h in hospitals}
    path = folder / files.PINNED_KEYS
    save_pinned(path, pinned)
    return path


def enrolled_node(folder: Path, hospital: str, pinned: Path) -> NodeConfig:
    """The node config of an enrolled hospital's SuperNode, with what secure aggregation
    needs (see fedmri.client.secure_client); callers add the rest."""
    return NodeConfig(hospital=hospital, identity_key=folder / hospital / files.IDENTITY_KEY,
                      pinned_keys=pinned, state_dir=folder / hospital / "state")
