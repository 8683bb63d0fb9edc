"""The run configuration shared by server, clients and baselines.

Flower carries configuration as flat key/value records, so the config is a flat dataclass
of scalars with a lossless round trip through a plain dict.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunConfig:
    model: str = _opt("unet", "network: unet, basicunet or segresnet (fedmri.common.models)")
    size: int = _opt(48, "model grid edge in voxels (a multiple of 8, >= 16)")
    fov_mm: float = _opt(224.0, "physical field of view of the model grid in mm")
    num_classes: int = _opt(3, "background, grey matter, white matter")
    rounds: int = _opt(16, "federated rounds")
    local_epochs: int = _opt(10, "epochs each hospital trains per round")
    batch_size: int = _opt(2, "volumes per training step")
    lr: float = _opt(3e-3, "learning rate")
    val_fraction: float = _opt(0.25, "share of each hospital's volumes kept for validation")
    seed: int = _opt(0, "training seed")
    amp: bool = _opt(True, "mixed precision where the device supports it (CUDA)")
    conv_backend: str = _opt("fedmri", "3D convolutions on fedmri.kernels (fedmri) or ATen (aten)")
    secure: bool = _opt(True, "secure aggregation: the server learns only the sum of the "
                              "hospitals' updates (--no-secure: plain FedAvg)")
    secure_clip: float = _opt(1.0, "per-coordinate clip of a hospital's update before masking")
    secure_max_weight: int = _opt(10000, "most training volumes one hospital may weigh")

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


# Fields that only a federation uses: the single-process baselines take no flags for them.
FEDERATION_ONLY = ("secure", "secure_clip", "secure_max_weight")


def add_run_config_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One command-line flag per RunConfig field (`--local-epochs`, `--[no-]secure`, ...)."""
    group = parser.add_argument_group("run config")
    for f in fields(RunConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f.metadata["help"])
        else:
            kind = type(f.default)
            group.add_argument(flag, type=kind, default=f.default, metavar=kind.__name__.upper(),
                               help=f"{f.metadata['help']} (default: {f.default})")


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed flags (see add_run_config_args); ValueError if invalid."""
    values = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    cfg = RunConfig(**values)
    cfg.validate()
    return cfg


def run_config_to_args(cfg: RunConfig, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that make add_run_config_args parse back to `cfg` (for child commands)."""
    args: list[str] = []
    for f in fields(RunConfig):
        if f.name in skip:
            continue
        flag, value = f.name.replace("_", "-"), getattr(cfg, f.name)
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args
