"""An enrollment ticket: what `fedmri server token --out FILE` hands a hospital and
`fedmri client init --ticket FILE` reads.

It carries the one-time token, so it is written owner-readable only and must travel
privately; it spares the token a place on a command line (visible to every local user in
the process list) and lets scripts and containers enroll without copying text by hand. The
CA fingerprint in it is only as trustworthy as the channel it came over: operators confirm
it by phone, as with `--ca-fingerprint`.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from fedmri.proto.names import check_hospital_name

MAX_BYTES = 4096


@dataclass(frozen=True)
class Ticket:
    hospital: str
    token: str
    ca_fingerprint: str
    coordinator: str  # the enrollment service, HOST:PORT

    def write(self, path: Path) -> None:
        """Owner-only (0600), atomically, through a fresh temp file (never one already there,
        which could be a link planted to catch the token)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(asdict(self), fh, indent=2)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def read(cls, path: Path) -> Ticket:
        try:
            # Not through a link, not a FIFO or device (which could block or never end).
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ValueError("not a regular file")
                data = fh.read(MAX_BYTES + 1)
            if len(data) > MAX_BYTES:
                raise ValueError(f"larger than {MAX_BYTES} bytes")
            raw = json.loads(data.decode())
            if not isinstance(raw, dict) or set(raw) != set(cls.__dataclass_fields__):
                raise ValueError(f"expected the keys {', '.join(cls.__dataclass_fields__)}")
            if not all(isinstance(v, str) and v.isprintable() and v for v in raw.values()):
                raise ValueError("every field must be a non-empty printable string")
            ticket = cls(**raw)
            check_hospital_name(ticket.hospital)
            return ticket
        except OSError as err:
            raise FileNotFoundError(f"cannot read the enrollment ticket {path}: "
                                    f"{err.strerror or err}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(f"{path} is not an enrollment ticket: {err}") from None
