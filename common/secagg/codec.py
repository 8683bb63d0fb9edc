"""Versioned, length-prefixed binary encoding for secure-aggregation messages.

Why our own small format: messages come from other hospitals and from the server, so decoding
must never execute code (no pickle) and must refuse truncated or padded input; masked vectors
are large, so they travel as raw little-endian bytes, not base64 text. Layout: a version byte,
a message-type byte, then fields in a fixed order; integers are big-endian fixed width, byte
strings and text are a u32 length followed by the bytes.

`canonical` is the unambiguous encoding of a tuple of fields that signatures, AES-GCM
associated data and HKDF labels are computed over (so "ab"+"c" never equals "a"+"bc").
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .errors import MalformedMessageError

VERSION = 1
_U32 = 2**32
_U64 = 2**64


class Writer:
    """Appends fields of one message; `finish()` returns the bytes."""

    def __init__(self, tag: int) -> None:
        self._parts: list[bytes] = [bytes((VERSION, tag))]

    def u32(self, value: int) -> Writer:
        if not 0 <= value < _U32:
            raise ValueError(f"{value} does not fit an unsigned 32-bit field")
        self._parts.append(struct.pack(">I", value))
        return self

    def u64(self, value: int) -> Writer:
        if not 0 <= value < _U64:
            raise ValueError(f"{value} does not fit an unsigned 64-bit field")
        self._parts.append(struct.pack(">Q", value))
        return self

    def blob(self, data: bytes) -> Writer:
        self.u32(len(data))
        self._parts.append(bytes(data))
        return self

    def text(self, value: str) -> Writer:
        return self.blob(value.encode("utf-8"))

    def texts(self, values: Sequence[str]) -> Writer:
        self.u32(len(values))
        for value in values:
            self.text(value)
        return self

    def blobs(self, values: Sequence[bytes]) -> Writer:
        self.u32(len(values))
        for value in values:
            self.blob(value)
        return self

    def finish(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads fields back in the order they were written; refuses short or padded input."""

    def __init__(self, data: bytes, tag: int, what: str) -> None:
        self._data = memoryview(bytes(data))
        self._pos = 0
        self._what = what
        head = self._take(2)
        if head[0] != VERSION:
            raise MalformedMessageError(
                f"{what}: encoding version {head[0]} is not supported (this build reads "
                f"version {VERSION}); update fedmri on both ends")
        if head[1] != tag:
            raise MalformedMessageError(f"{what}: message type {head[1]} where {tag} was expected")

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise MalformedMessageError(
                f"{self._what}: truncated (needs {n} more bytes at offset {self._pos}, "
                f"has {len(self._data) - self._pos})")
        out = bytes(self._data[self._pos:self._pos + n])
        self._pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def blob(self) -> bytes:
        return self._take(self.u32())

    def text(self) -> str:
        raw = self.blob()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessageError(f"{self._what}: a text field is not UTF-8") from exc

    def _count(self, minimum_item: int) -> int:
        count = self.u32()
        if count * minimum_item > len(self._data) - self._pos:
            raise MalformedMessageError(f"{self._what}: list of {count} items cannot fit")
        return count

    def texts(self) -> tuple[str, ...]:
        return tuple(self.text() for _ in range(self._count(4)))

    def blobs(self) -> tuple[bytes, ...]:
        return tuple(self.blob() for _ in range(self._count(4)))

    def done(self) -> None:
        if self._pos != len(self._data):
            raise MalformedMessageError(
                f"{self._what}: {len(self._data) - self._pos} unexpected trailing bytes")


def canonical(label: str, *fields: str | bytes | int) -> bytes:
    """Injective encoding of (label, fields...) for signing, AEAD data and key derivation."""
    parts = [Writer(0).text(label).finish()]
    for field in fields:
        if isinstance(field, bool):
            raise TypeError("booleans are not canonical fields")
        if isinstance(field, int):
            parts.append(b"i" + Writer(0).u64(field).finish()[2:])
        elif isinstance(field, str):
            parts.append(b"s" + Writer(0).text(field).finish()[2:])
        else:
            parts.append(b"b" + Writer(0).blob(field).finish()[2:])
    return b"".join(parts)
