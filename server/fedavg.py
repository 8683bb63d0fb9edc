"""FedAvg: the example-weighted mean of the hospitals' weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_average(states: Sequence[tuple[dict[str, torch.Tensor], float]]
                     ) -> dict[str, torch.Tensor]:
    """Mean of state dicts weighted by their example counts, accumulated in float64.

    Integer buffers (counters) are not averaged: the first state's value is kept.
    """
    if not states:
        raise ValueError("nothing to average: no hospital returned weights")
    total = float(sum(weight for _, weight in states))
    if total <= 0:
        raise ValueError(f"the summed example count is {total}; every hospital reported none")
    keys = list(states[0][0])
    for state, _ in states[1:]:
        if list(state) != keys:
            raise ValueError("hospitals returned different model layouts; check the run config")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][0][key]
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in states:
            acc += state[key].to(torch.float64) * (weight / total)
        out[key] = acc.to(first.dtype)
    return out
