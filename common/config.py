"""The run configuration shared by server, clients and baselines.

Flower carries configuration as flat key/value records, so the config is a flat dataclass
of scalars with a lossless round trip through a plain dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class RunConfig:
    model: str = "unet"  # see fedmri.common.models.MODELS
    size: int = 48  # model grid is size^3 voxels
    fov_mm: float = 224.0  # physical field of view of the model grid (head + margin)
    num_classes: int = 3  # background, grey matter, white matter
    rounds: int = 16
    local_epochs: int = 10
    batch_size: int = 2
    lr: float = 3e-3
    val_fraction: float = 0.25
    seed: int = 0
    amp: bool = True  # mixed precision where the device supports it (CUDA)
    conv_backend: str = "fedmri"  # 3D convolutions on fedmri.kernels ("fedmri") or ATen ("aten")
    secure: bool = True  # secure aggregation (the server learns only the sum of updates)
    secure_clip: float = 1.0  # per-coordinate clip of a hospital's update before masking
    secure_max_weight: int = 10000  # most training volumes one hospital may weigh

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a flat mapping; unknown keys are ignored, wrong types are refused."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            default = getattr(cls, f.name)
            raw = values[f.name]
            kind = type(default)
            if kind is bool:
                if not isinstance(raw, bool):
                    raise ValueError(f"run config '{f.name}' must be true/false, got {raw!r}")
                kwargs[f.name] = raw
            else:
                try:
                    kwargs[f.name] = kind(raw)
                except (TypeError, ValueError) as err:
                    raise ValueError(
                        f"run config '{f.name}' must be {kind.__name__}, got {raw!r}"
                    ) from err
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.size < 16 or self.size % 8:
            raise ValueError(f"size must be a multiple of 8 and >= 16, got {self.size}")
        if self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("rounds, local_epochs and batch_size must be >= 1")
        if self.conv_backend not in ("fedmri", "aten"):
            raise ValueError(f"conv_backend must be 'fedmri' or 'aten', got {self.conv_backend!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
