"""A model's named arrays as one safetensors blob, the form in which they cross Flower's links.

Flower 1.42 moves every array of a message as its own object (plus its chunks), and each hop —
ServerApp to SuperLink, SuperLink to SuperNode, SuperNode to ClientApp, and back — pushes and
pulls them one request at a time: for the tiny model's 206 tensors a 3 MB reply took 8-10 s,
against 0.3 s for a reply without arrays. One blob per record is a few objects per hop. The
blob is safetensors (no code runs on load, offsets are checked); the order of the names and the
exact shapes (safetensors keeps neither order nor a 0-d shape) travel in its metadata. Bad bytes
raise `TransportError`, a one-line reason, so a hostile party's blob is refused and named, never
a traceback.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

PACKED = "remdr.packed.safetensors"  # the one name of a packed record's one array
_ORDER = "remdr-order"
MAX_HEADER = 16 << 20  # a safetensors header above this is not a model's
MAX_DIMS = 32  # no model tensor has more; numpy refuses more than 64


class TransportError(ValueError):
    """A packed record that cannot be read back."""


def pack(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """`arrays` (in order) as one uint8 array of safetensors bytes."""
    tensors = {k: np.asarray(v, order="C") for k, v in arrays.items()}  # keeps a 0-d shape
    layout = [[k, list(v.shape)] for k, v in tensors.items()]
    blob = save_safetensors(tensors, metadata={_ORDER: json.dumps(layout)})
    return np.frombuffer(blob, dtype=np.uint8)


def unpack(blob: np.ndarray) -> OrderedDict[str, np.ndarray]:
    """The arrays `pack` was given, in their order; TransportError when `blob` is not such."""
    if not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 1:
        raise TransportError("a packed record is not one flat byte array")
    data = blob.tobytes()
    try:
        layout = _layout(data)
        arrays = load_safetensors(data)
    except TransportError:
        raise
    except Exception as err:  # safetensors' own error types vary by version
        raise TransportError(f"a packed record is not valid safetensors ({err})") from None
    if sorted(layout) != sorted(arrays):
        raise TransportError("a packed record's name list does not match its arrays")
    out = OrderedDict()
    for name, shape in layout.items():
        try:
            if math.prod(shape) != arrays[name].size:  # exact: np.prod wraps around at 2**64
                raise ValueError
            out[name] = arrays[name].reshape(shape)  # (0, 2**63) fits no numpy array either
        except ValueError:
            raise TransportError(
                f"a packed record's shape of {name[:60]!r} does not fit its data"
            ) from None
    return out


def _layout(data: bytes) -> dict[str, tuple[int, ...]]:
    """Each name's shape, in the order `pack` kept, from the safetensors header's metadata."""
    if len(data) < 8:
        raise TransportError("a packed record is shorter than a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER, len(data) - 8):
        raise TransportError("a packed record's header is larger than the record")
    try:
        header = json.loads(data[8 : 8 + size])
        pairs = json.loads(header["__metadata__"][_ORDER])
    except (ValueError, KeyError, TypeError):
        raise TransportError("a packed record has no readable name list") from None
    if not (isinstance(pairs, list) and all(_is_name_and_shape(p) for p in pairs)):
        raise TransportError("a packed record's name list is not names with shapes")
    layout = {name: tuple(shape) for name, shape in pairs}
    if len(layout) != len(pairs):
        raise TransportError("a packed record names an array twice")
    return layout


def _is_name_and_shape(pair: object) -> bool:
    """`[name, [n, ...]]` with a string name and non-negative integer sizes (bool is no size)."""
    if not (isinstance(pair, list) and len(pair) == 2):
        return False
    name, shape = pair
    return (
        isinstance(name, str)
        and isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(type(n) is int and n >= 0 for n in shape)
    )


def pack_records(content):
    """A copy of Flower's RecordDict `content` with each non-empty ArrayRecord packed into one
    array. The core never imports Flower, so the record types come from the records themselves."""
    out = type(content)()
    for name, record in content.items():
        if name in content.array_records and len(record) and PACKED not in record:
            array_type = type(next(iter(record.values())))
            named = {k: v.numpy() for k, v in record.items()}
            record = type(record)(OrderedDict([(PACKED, array_type(pack(named)))]))
        out[name] = record
    return out


def unpack_records(content):
    """A copy of `content` with each packed ArrayRecord read back into its named arrays; a
    record that is not packed passes unchanged. TransportError for a packed one that is bad."""
    out = type(content)()
    for name, record in content.items():
        if name in content.array_records and PACKED in record:
            if len(record) != 1:
                raise TransportError(f"record {name!r} mixes a packed blob with other arrays")
            array_type = type(record[PACKED])
            arrays = unpack(record[PACKED].numpy())
            record = type(record)(OrderedDict((k, array_type(v)) for k, v in arrays.items()))
        out[name] = record
    return out
