"""The cohort of `fedmri bench secagg`: every client's vector and weight, from the run config.

The harness, the benchmark ServerApps and ClientApps all derive the same numbers from the same
few run-config values, so the server can compute the exact weighted mean (float64) that an
aggregation variant should have produced, without ever seeing a client's vector.

Client i (node config `NodeConfig.bench_index`, 0..N-1) holds
`np.random.default_rng([seed, i]).normal(0, STD, params).astype(np.float32)` with weight
`examples[i]` (one number for every client, or one per client). Run-config keys: the fields
of BenchCohort, `examples` written "1000" or "800,1000,1200".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

STD = 0.05  # standard deviation of every coordinate of a client's vector
DEFAULT_CLIP = 0.5  # 10 standard deviations: no coordinate of any cohort here gets clipped


def parse_examples(text: str, clients: int) -> tuple[int, ...]:
    """`"1000"` (every client) or `"800,1000,1200"` (one per client) as a tuple of weights."""
    try:
        values = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError as err:
        raise ValueError(f"examples must be integers separated by commas, got {text!r}") from err
    if len(values) == 1:
        values = values * clients
    if len(values) != clients or any(v < 1 for v in values):
        raise ValueError(f"examples must be one positive integer or {clients} of them "
                         f"(one per client), got {text!r}")
    return values


@dataclass(frozen=True)
class BenchCohort:
    clients: int
    params: int
    rounds: int = 2
    examples: tuple[int, ...] = ()  # one weight per client; empty: 1000 each
    seed: int = 0
    clip: float = DEFAULT_CLIP

    def __post_init__(self) -> None:
        if self.clients < 2:
            raise ValueError(f"clients must be >= 2 (secure aggregation needs two), "
                             f"got {self.clients}")
        if self.params < 1 or self.rounds < 1:
            raise ValueError(f"params and rounds must be >= 1, got {self.params}, {self.rounds}")
        if not self.examples:
            object.__setattr__(self, "examples", (1000,) * self.clients)
        if len(self.examples) != self.clients or min(self.examples) < 1:
            raise ValueError(f"need {self.clients} positive weights, got {self.examples}")
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")

    def vector(self, index: int) -> npt.NDArray[np.float32]:
        if not 0 <= index < self.clients:
            raise ValueError(f"client index {index} outside 0..{self.clients - 1}; check the "
                             "SuperNode's node config")
        rng = np.random.default_rng([self.seed, index])
        return rng.normal(0.0, STD, self.params).astype(np.float32)

    def weight(self, index: int) -> int:
        return self.examples[index]

    def exact_mean(self) -> npt.NDArray[np.float64]:
        """The weighted mean of all clients' vectors in float64 (one vector in memory at once)."""
        total = np.zeros(self.params, dtype=np.float64)
        for i in range(self.clients):
            total += self.weight(i) * self.vector(i).astype(np.float64)
        total /= sum(self.examples)
        return total

    def to_run_config(self) -> dict[str, int | float | str]:
        values = asdict(self)
        values["examples"] = ",".join(str(e) for e in self.examples)
        return values

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> BenchCohort:
        """The cohort from a run config (its keys are BenchCohort's field names)."""
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in config]
        if missing:
            raise ValueError(f"the run config lacks {', '.join(missing)}; start the benchmark "
                             "with `fedmri bench secagg`")
        clients = int(config["clients"])
        return cls(clients=clients, params=int(config["params"]),
                   rounds=int(config.get("rounds", cls.rounds)),
                   examples=parse_examples(str(config.get("examples", "1000")), clients),
                   seed=int(config.get("seed", cls.seed)),
                   clip=float(config.get("clip", cls.clip)))
