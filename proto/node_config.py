"""The SuperNode's node config: what a hospital's operator sets for its ClientApp.

Flower passes it to every ClientApp process as `context.node_config`, set with
`flower-supernode --node-config 'key=value ...'` (`to_node_config_arg`). The ClientApp reads
it once, typed, with `NodeConfig.from_context`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedmri.proto.typed_config import (
    NAME,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    key_of,
    parse,
    setting,
    to_record,
    toml_value,
)


class HasNodeConfig(Protocol):
    """What NodeConfig needs of a Flower Context."""

    @property
    def node_id(self) -> int: ...

    @property
    def node_config(self) -> Any: ...


@dataclass(frozen=True)
class NodeConfig:
    hospital: str = setting("hospital", help="the hospital's name, as enrolled", check=NAME)
    data_path: Path | None = setting("data-path", None, "the hospital's DICOM folder")
    threads: int = setting("threads", 0, "torch CPU threads; 0: torch's default", NON_NEGATIVE)
    tp: int = setting("tp", 1, "tensor-parallel ranks that split each volume in depth", POSITIVE)
    dp: int = setting("dp", 1, "data-parallel replicas of those ranks (dp x tp processes)",
                      POSITIVE)
    identity_key: Path | None = setting(
        "identity-key", None, "the hospital's Ed25519 identity key (PEM), secure aggregation")
    pinned_keys: Path | None = setting(
        "pinned-keys", None, "the enrolled hospitals' public keys (JSON), secure aggregation")
    state_dir: Path | None = setting(
        "state-dir", None, "where secure-aggregation round state is kept between messages")
    runs_dir: Path | None = setting(
        "runs-dir", None, "runs seen and approved (fedmri.client.run_approval); unset: every "
        "run is joined")
    run_policy: Path | None = setting("run-policy", None,
                                      "the hospital's run policy file (policy.toml)")
    # Benchmark SuperNodes only (`fedmri bench secagg`).
    bench_index: int | None = setting("index", None, "this client's place in the bench cohort",
                                      NON_NEGATIVE)
    cpu_dir: Path | None = setting("cpu-dir", None, "where bench ClientApps record their CPU")

    @classmethod
    def from_context(cls, context: HasNodeConfig) -> NodeConfig:
        return cls.from_mapping(dict(context.node_config), context.node_id)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], node_id: int = 0) -> NodeConfig:
        return parse(cls, values, f"node config of SuperNode {node_id}")

    def require(self, name: str, purpose: str) -> Any:
        """The value of field `name`; a clear error when the operator did not set it."""
        value = getattr(self, name)
        if value is None:
            key = key_of(NodeConfig, name)
            raise ConfigError(f"hospital {self.hospital}: {purpose} needs '{key}' in the "
                              "SuperNode's node config (flower-supernode --node-config)")
        return value

    def to_node_config(self) -> dict[str, str | int | float | bool]:
        return to_record(self)

    def to_node_config_arg(self) -> str:
        """The value of `flower-supernode --node-config`: space-separated key=TOML value."""
        return " ".join(f"{k}={toml_value(v)}" for k, v in self.to_node_config().items())

