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
    index = json.loads(raw) if isinstance(raw, str) else None
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


def unpack(content: RecordDict) -> dict[str, torch.Tensor]:
    """The state dict a message carries; ValueError saying what is wrong with it."""
    import torch

    if not has_weights(content):
        raise ValueError("the message carries no weights")
    try:
        entries = _entries(content.config_records[wire.WEIGHTS_INDEX][INDEX])
        blob = content.array_records[wire.ARRAYS][PACKED].numpy()
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"the weights do not decode ({err})") from err
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ValueError(f"the packed weights are {blob.dtype} {blob.shape}, not bytes")
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
