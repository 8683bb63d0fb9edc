"""Atomic writes: a reader (or a restart) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through `write` into a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_json(path: Path, data: Any) -> None:
    payload = json.dumps(data, indent=2).encode()
    atomic_write(path, lambda fh: None if fh.write(payload) else None)


def save_model(path: Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any],
               extra: dict[str, Any] | None = None) -> None:
    """A checkpoint loadable with fedmri.common.models.load_model."""
    import torch  # here, so modules that only write JSON do not pay for importing torch

    blob = {"state_dict": state_dict, "config": config, **(extra or {})}
    atomic_write(path, lambda fh: torch.save(blob, fh))
