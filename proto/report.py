"""The per-round record of a run: in `server_state.json` (the ServerApp's resume state) and in
`report.json` (simulate and the baselines), read by the benchmarks, plots and operators."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class HospitalRound:
    num_examples: int = 0  # training volumes
    train_loss: float | None = None
    train_seconds: float | None = None
    val_dice: float | None = None  # of the global model this round produced
    val_loss: float | None = None
    # Starting its dp x tp worker processes and their process group (hospitals on a mesh).
    mesh_setup_seconds: float | None = None


@dataclass
class RoundRecord:
    round: int
    seconds: float  # wall time of the whole round
    train_seconds: float  # the slowest hospital's local training
    aggregate_seconds: float = 0.0
    # Everything in the round that is neither the slowest hospital's training nor the
    # aggregation: message latency, ClientApp start-up, data loading, validation.
    comm_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    global_val_dice: float | None = None  # validation-weighted mean over the hospitals
    failures: list[str] = field(default_factory=list)
    hospitals: dict[str, HospitalRound] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundRecord:
        hospitals = {h: HospitalRound(**v) for h, v in raw.get("hospitals", {}).items()}
        return cls(**{**raw, "hospitals": hospitals})
