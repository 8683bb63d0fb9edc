"""Measuring helpers shared by the benchmark apps and harnesses."""

from __future__ import annotations

import resource


def cpu_seconds() -> float:
    """This process's user + system CPU time so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_mb() -> float:
    """This process's peak resident set (ru_maxrss, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean(values: list[float]) -> float:
    return sum(values) / len(values)
