"""The reference the kernel tests compare against: F.conv3d on the concatenated input."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACT = {None: lambda y: y, "relu": F.relu, "leaky_relu": lambda y: F.leaky_relu(y, 0.1)}


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
              lo: torch.Tensor | None, hi: torch.Tensor | None, stride: int,
              activation: str | None) -> torch.Tensor:
    """conv3d of [lo | x | hi] (zeros for a missing halo), 'same' padding in H and W."""
    p = w.shape[2] // 2
    n, c, _, h, wd = x.shape

    def pad(t: torch.Tensor | None) -> torch.Tensor:
        return t if t is not None else x.new_zeros(n, c, p, h, wd)

    xe = torch.cat([pad(lo), x, pad(hi)], 2)
    return ACT[activation](F.conv3d(xe, w, b, stride=stride, padding=(0, p, p)))


def make_inputs(n: int, c: int, cout: int, dhw: tuple[int, int, int], k: int, halo_lo: bool,
                halo_hi: bool, dtype: torch.dtype, device: str = "cpu",
                bias: bool = True) -> dict[str, torch.Tensor | None]:
    d, h, w = dhw
    p = k // 2

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, dtype=torch.float64) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    return {"x": rnd(n, c, d, h, w), "w": rnd(cout, c, k, k, k, scale=(c * k**3) ** -0.5),
            "b": rnd(cout) if bias else None,
            "lo": rnd(n, c, p, h, w) if halo_lo else None,
            "hi": rnd(n, c, p, h, w) if halo_hi else None}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 on the CPU; a halo the stride never reads has an
    all-zero gradient, so a zero reference counts as norm 1e-12."""
    err = float((a.detach().double().cpu() - ref.detach().double().cpu()).norm())
    return err / max(float(ref.detach().double().norm()), 1e-12)
