"""Hospital names: what enrollment accepts and what a hospital accepts from its coordinator.

Lower-case letters, digits, '.', '_' and '-', 1 to 63 characters, starting with a letter or
digit: no spaces, control characters or look-alike letters that could make two names read
the same in a terminal or a log.
"""

from __future__ import annotations

import re

HOSPITAL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def check_hospital_name(name: str) -> str:
    if not HOSPITAL_NAME.fullmatch(name):
        raise ValueError(f"hospital name {name[:80]!r}: use 1-63 lower-case letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit")
    return name
