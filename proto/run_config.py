"""The ServerApp's own run-config keys (beside the RunConfig fields, fedmri.common.config).

A run's config is one flat mapping (the Flower App's [tool.flwr.app.config], overridable with
`flwr run -c`): every RunConfig field under its own name, plus the settings below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmri.proto.typed_config import POSITIVE, parse, setting, to_record


@dataclass(frozen=True)
class ServerSettings:
    out_dir: Path = setting("out-dir", Path("fedmri-run"),
                            "where checkpoints, events and the report go")
    min_nodes: int = setting("min-nodes", 1, "hospitals the first round waits for", POSITIVE)
    node_wait_s: float = setting("node-wait-s", 300.0, "seconds to wait for min-nodes",
                                 POSITIVE)
    round_timeout_s: float = setting("round-timeout-s", 3600.0,
                                     "seconds for a step with training (the slowest hospital)",
                                     POSITIVE)
    stage_timeout_s: float = setting("stage-timeout-s", 120.0,
                                     "seconds for a secure-aggregation step without training",
                                     POSITIVE)
    pinned_keys: Path | None = setting("pinned-keys", None,
                                       "the enrolled hospitals' identity keys (JSON)")
    # Benchmarks only (`fedmri bench secagg`).
    grid_poll_s: float = setting("grid-poll-s", 0.2, "seconds between pulls for replies",
                                 POSITIVE)
    variant: str = setting("variant", "", "the aggregation variant a bench run measures")

    @classmethod
    def from_run_config(cls, values: dict[str, Any]) -> ServerSettings:
        return parse(cls, values, "run config")

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        return to_record(self)
