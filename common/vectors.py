"""Model updates as one flat vector, in state-dict order of the floating-point tensors.

Integer buffers (counters) are not part of the update: secure aggregation sums only what can
be averaged; they keep the global model's value.
"""

from __future__ import annotations

import numpy as np
import torch


def float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def vector_length(state: dict[str, torch.Tensor]) -> int:
    return sum(state[k].numel() for k in float_keys(state))


def flatten_update(local: dict[str, torch.Tensor], global_: dict[str, torch.Tensor]
                   ) -> np.ndarray:
    """local - global for every floating tensor, concatenated (float64)."""
    parts = [(local[k].double() - global_[k].double()).reshape(-1).numpy()
             for k in float_keys(global_)]
    return np.concatenate(parts) if parts else np.zeros(0)


def apply_update(global_: dict[str, torch.Tensor], update: np.ndarray
                 ) -> dict[str, torch.Tensor]:
    """global + update, the inverse of flatten_update; refuses a vector of the wrong length."""
    expected = vector_length(global_)
    if update.shape != (expected,):
        raise ValueError(f"update has shape {update.shape}, the model needs ({expected},)")
    out = dict(global_)
    offset = 0
    for k in float_keys(global_):
        n = global_[k].numel()
        delta = torch.from_numpy(np.ascontiguousarray(update[offset:offset + n]))
        out[k] = (global_[k].double() + delta.reshape(global_[k].shape)).to(global_[k].dtype)
        offset += n
    return out
