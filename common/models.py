"""Models are built by name from the run config, so server and clients build the same one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fedmri.common.config import RunConfig


def _unet(cfg: RunConfig) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=cfg.num_classes,
                channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1,
                norm="instance")


def _basicunet(cfg: RunConfig) -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=cfg.num_classes,
                     features=(8, 8, 16, 32, 64, 8), norm=("instance", {"affine": True}))


def _segresnet(cfg: RunConfig) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=1, out_channels=cfg.num_classes,
                     init_filters=8, norm=("group", {"num_groups": 4}))


MODELS: dict[str, Callable[[RunConfig], nn.Module]] = {
    "unet": _unet,
    "basicunet": _basicunet,
    "segresnet": _segresnet,
}


def build_model(cfg: RunConfig, seed: int | None = None) -> nn.Module:
    """The network named by cfg.model, initialised deterministically from `seed` (or cfg.seed)."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model '{cfg.model}'; choose one of {sorted(MODELS)}")
    torch.manual_seed(cfg.seed if seed is None else seed)
    model = MODELS[cfg.model](cfg)
    if cfg.conv_backend == "fedmri":
        from fedmri.kernels import use_fedmri_conv

        use_fedmri_conv(model)  # same parameters; the op compiles on first forward
    return model


def load_model(path: Path) -> tuple[nn.Module, RunConfig]:
    """Load a checkpoint written by fedmri.common.checkpoint.save_model."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob:
        raise ValueError(f"{path} is not a fedmri model checkpoint (no state_dict/config)")
    cfg = RunConfig.from_dict(blob["config"])
    model = build_model(cfg)
    model.load_state_dict(blob["state_dict"])
    return model, cfg
