"""Local training and evaluation of the segmentation model on one hospital's cases."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from fedmri.client.dataset import Case
from fedmri.common.config import RunConfig


@dataclass
class TrainResult:
    loss: float  # mean Dice+CE loss over the last epoch
    seconds: float
    steps: int


@dataclass
class EvalResult:
    dice: float  # mean foreground Dice over cases and classes
    loss: float
    per_class: list[float]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(cfg: RunConfig, dev: torch.device) -> AbstractContextManager[object]:
    # Mixed precision only where it pays: CUDA. On CPU, bf16 autocast slows 3D convs down.
    if cfg.amp and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _batches(cases: Sequence[Case], batch_size: int, rng: np.random.Generator,
             augment: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = rng.permutation(len(cases))
    out = []
    for start in range(0, len(order), batch_size):
        picked = [cases[i] for i in order[start:start + batch_size]]
        images = np.stack([c.image for c in picked])
        labels = np.stack([c.label for c in picked])[:, None]
        if augment and rng.random() < 0.5:
            # Left-right mirror: brains are near-symmetric, so this is a label-preserving flip.
            images, labels = images[..., ::-1], labels[..., ::-1]
        out.append((torch.from_numpy(np.ascontiguousarray(images)),
                    torch.from_numpy(np.ascontiguousarray(labels))))
    return out


def loss_fn() -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True)


class Objective(Protocol):
    """How a training step turns a batch into a loss and gradients: one process
    (`WholeVolume`), or one rank of a spatial mesh (fedmri.client.spatial.training)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def reduce_gradients(self, model: nn.Module) -> None: ...


class WholeVolume:
    """The whole batch in this process: MONAI's Dice + cross-entropy."""

    def __init__(self) -> None:
        self.criterion = loss_fn()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = self.criterion(model(x), y)
        return loss

    def reduce_gradients(self, model: nn.Module) -> None:
        pass


def train_local(model: nn.Module, cases: Sequence[Case], cfg: RunConfig, epochs: int,
                seed: int, objective: Objective | None = None,
                dev: torch.device | None = None) -> TrainResult:
    """Train `model` in place for `epochs` passes over `cases`.

    The batches, their order and augmentation depend only on `seed` and the cases, so every
    rank of a spatial mesh (each holding its slab of the same cases) steps in lockstep."""
    if not cases:
        raise ValueError("no training cases: the hospital has no accepted series with labels")
    dev = dev or device()
    objective = objective or WholeVolume()
    model.to(dev).train()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start = time.perf_counter()
    steps, epoch_loss = 0, 0.0
    for _ in range(epochs):
        losses = []
        for x, y in _batches(cases, cfg.batch_size, rng, augment=True):
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad(set_to_none=True)
            with autocast(cfg, dev):
                loss = objective(model, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {steps}")
            if loss.requires_grad:  # a data-parallel replica without a sample has no graph
                loss.backward()
            objective.reduce_gradients(model)
            opt.step()
            losses.append(float(loss.detach()))
            steps += 1
        epoch_loss = float(np.mean(losses))
    model.cpu()
    return TrainResult(loss=epoch_loss, seconds=time.perf_counter() - start, steps=steps)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class (1..C-1); a class absent from both counts as 1."""
    scores = []
    for k in range(1, num_classes):
        p, t = pred == k, truth == k
        denom = p.sum() + t.sum()
        scores.append(1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom))
    return scores


@torch.no_grad()
def predict(model: nn.Module, image: np.ndarray, cfg: RunConfig) -> tuple[np.ndarray, torch.Tensor]:
    """Label map (D, H, W) and logits (1, C, D, H, W) for one (1, D, H, W) image."""
    dev = device()
    model.to(dev).eval()
    with autocast(cfg, dev):
        logits = model(torch.from_numpy(image[None]).to(dev)).float().cpu()
    return logits.argmax(1)[0].numpy(), logits


def evaluate(model: nn.Module, cases: Sequence[Case], cfg: RunConfig) -> EvalResult:
    if not cases:
        raise ValueError("no validation cases to evaluate on")
    criterion = loss_fn()
    per_case, losses = [], []
    for case in cases:
        pred, logits = predict(model, case.image, cfg)
        per_case.append(dice_per_class(pred, case.label, cfg.num_classes))
        target = torch.from_numpy(case.label[None, None])
        losses.append(float(criterion(logits, target)))
    per_class = np.mean(np.asarray(per_case), axis=0)
    model.cpu()
    return EvalResult(dice=float(per_class.mean()), loss=float(np.mean(losses)),
                      per_class=[float(v) for v in per_class])
