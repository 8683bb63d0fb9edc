"""Atomic writes: a reader (or a restart) sees the old file or the new one, never half of one."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], object], mode: int = 0o600) -> None:
    """Write through `write` into a temp file beside `path`, fsync, then rename over it.
    The file gets `mode` before any byte is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
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
    atomic_write(path, lambda fh: fh.write(payload))


def write_private(path: Path, data: bytes) -> None:
    """Owner-readable only (0600), atomically: private keys and protocol state."""
    atomic_write(path, lambda fh: fh.write(data), mode=0o600)


def save_model(path: Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any],
               extra: dict[str, Any] | None = None) -> None:
    """A checkpoint loadable with fedmri.common.models.load_model."""
    import torch  # here, so modules that only write JSON do not pay for importing torch

    blob = {"state_dict": state_dict, "config": config, **(extra or {})}
    # Serialized in memory first: torch's zip writer turns a failed write (a full disk) into
    # an unrelated RuntimeError; written from bytes, it is the OSError it is.
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    payload = buffer.getbuffer()
    atomic_write(path, lambda fh: fh.write(payload))
