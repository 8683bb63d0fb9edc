"""A model's weights on the wire: one Flower Array holding every tensor's bytes, and an index.

Flower sends each Array of a message as an object of its own, and every object is a round trip
on each hop (ServerApp -> SuperLink -> SuperNode -> ClientApp): the 37 tensors of the trainer's
UNet took about 4 s to reach the ClientApp on the 2-core VM, the same bytes as one Array
0.1-0.9 s (`fedmri bench executor`, docs/benchmarks.md). So a state dict travels as
ARRAYS = ArrayRecord({PACKED: uint8 Array, the tensors' bytes back to back}) and
WEIGHTS_INDEX = ConfigRecord({INDEX: JSON list of [name, dtype, shape]}), in state-dict order.

`unpack` trusts nothing it reads: the index must parse, name each tensor once with a plain
numeric dtype and a shape, and account for every byte; the receiver then checks the layout
against its own model (the server: fedmri.server.fedavg; a hospital: load_state_dict).
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedmri.proto import wire

if TYPE_CHECKING:
    import torch

PACKED = "packed"
INDEX = "index"
DTYPES = ("<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "|b1")
MAX_TENSORS = 100_000
MAX_INDEX_CHARS = 8 << 20


def pack(state: dict[str, torch.Tensor]) -> dict[str, ArrayRecord | ConfigRecord]:
    """The records carrying `state` (merge them into a message's RecordDict)."""
    index, parts = [], []
    for name, tensor in state.items():
        array = tensor.detach().cpu().contiguous().numpy()
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        index.append([name, array.dtype.str, list(array.shape)])
        parts.append(array.tobytes())
    blob = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return {wire.ARRAYS: ArrayRecord({PACKED: Array(blob)}),
            wire.WEIGHTS_INDEX: ConfigRecord({INDEX: json.dumps(index)})}


def has_weights(content: RecordDict) -> bool:
    return wire.ARRAYS in content.array_records and wire.WEIGHTS_INDEX in content.config_records


def _entries(raw: Any) -> list[tuple[str, np.dtype[Any], tuple[int, ...]]]:
    if not isinstance(raw, str) or len(raw) > MAX_INDEX_CHARS:
        raise ValueError("the weights' index is not a JSON text of at most "
                         f"{MAX_INDEX_CHARS} characters")
    index = json.loads(raw)
    if not isinstance(index, list) or len(index) > MAX_TENSORS:
        raise ValueError("the weights' index is not a list of tensors")
    out, seen = [], set()
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and entry[1] in DTYPES and isinstance(entry[2], list)
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                        for d in entry[2])):
            raise ValueError(f"the weights' index has a bad entry {str(entry)[:80]!r}")
        if entry[0] in seen:
            raise ValueError(f"the weights' index names {entry[0]!r} twice")
        seen.add(entry[0])
        out.append((entry[0], np.dtype(entry[1]), tuple(entry[2])))
    return out


def _bytes_of(record: ArrayRecord) -> np.ndarray:
    """The packed Array's bytes, without letting its .npy header allocate anything: the
    header must declare a 1-D uint8 array exactly as long as the bytes that follow it."""
    if list(record) != [PACKED]:
        raise ValueError(f"the weights' ArrayRecord holds {sorted(record)[:3]}, not [{PACKED!r}]")
    data = record[PACKED].data
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"the packed weights use .npy version {version}")
    if dtype != np.uint8 or len(shape) != 1 or shape[0] != len(data) - stream.tell():
        raise ValueError(f"the packed weights' header declares {dtype} {shape}, not the "
                         f"{len(data) - stream.tell()} bytes that follow it")
    return np.frombuffer(data, dtype=np.uint8, offset=stream.tell())


def unpack(content: RecordDict) -> dict[str, torch.Tensor]:
    """The state dict a message carries; ValueError saying what is wrong with it."""
    import torch

    if not has_weights(content):
        raise ValueError("the message carries no weights")
    try:
        entries = _entries(content.config_records[wire.WEIGHTS_INDEX][INDEX])
        blob = _bytes_of(content.array_records[wire.ARRAYS])
    except Exception as err:  # noqa: BLE001 - whatever a crafted record raises is a refusal
        raise ValueError(f"the weights do not decode: {err}"[:500]) from err
    sizes = [int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for _, dtype, shape in entries]
    if sum(sizes) != blob.size:
        raise ValueError(f"the weights' index accounts for {sum(sizes)} bytes, the packed "
                         f"array holds {blob.size}")
    state, offset = {}, 0
    for (name, dtype, shape), size in zip(entries, sizes, strict=True):
        values = blob[offset:offset + size].view(dtype).reshape(shape)
        state[name] = torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))
        offset += size
    return state
