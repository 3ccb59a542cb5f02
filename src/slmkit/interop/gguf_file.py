"""Reading a GGUF file's metadata and tensor index, fast.

Why not `gguf.GGUFReader`: it builds a numpy view per array item, so a file with a 150k-token
vocabulary and as many merges takes seconds to open before a single weight is read (4 s for
SmolLM2's 49k tokens here). The format is simple (llama.cpp's docs/gguf.md: header, key/value
pairs, tensor infos, aligned data), so the keys are read here with `struct` over a memory map in
milliseconds. Tensors keep gguf-py's conventions (`GGMLQuantizationType`, dims in ggml order, data
as a memory-mapped array of the shape `gguf.quants.dequantize` expects), and gguf-py still does
all dequantizing and all writing.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

# GGUF value types -> (struct format, numpy dtype) for the fixed-size ones
SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16), 4: ("<I", np.uint32),
           5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_), 10: ("<Q", np.uint64),
           11: ("<q", np.int64), 12: ("<d", np.float64)}
STRING, ARRAY = 8, 9
PLAIN = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
         "I64": np.int64}


@dataclass
class Tensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: the row length first
    data: np.ndarray  # memory-mapped: the values for plain types, the raw blocks (rows, bytes) for quantized


class GgufContents:
    """`fields` (key -> Python value: str, int, float, bool or list) and `tensors`, in file order."""

    def __init__(self, path: str | Path):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._at = 0
        magic, version = self._read("<4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_tensors, n_kv = self._read("<QQ")
        self.fields = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._read("<I")[0])
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-self._at // alignment) * alignment
        self.tensors = [self._tensor(gguf, name, dims, kind, start + offset) for name, dims, kind, offset in infos]

    def _read(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._map, self._at)
        self._at += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._read("<Q")
        text = self._map[self._at:self._at + n].decode("utf-8", errors="replace")
        self._at += n
        return text

    def _value(self, kind: int):
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            item, count = self._read("<IQ")
            if item == STRING:
                return [self._string() for _ in range(count)]
            if item == ARRAY:
                return [self._value(ARRAY) for _ in range(count)]
            dtype = SCALARS[item][1]
            values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._at)
            self._at += values.nbytes
            return values.tolist()
        return self._read(SCALARS[kind][0])[0]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        (n_dims,) = self._read("<I")
        dims = self._read(f"<{n_dims}Q")
        kind, offset = self._read("<IQ")
        return name, dims, kind, offset

    def _tensor(self, gguf, name: str, dims: tuple[int, ...], kind: int, offset: int) -> Tensor:
        ggml_type = gguf.GGMLQuantizationType(kind)
        shape = tuple(reversed(dims))  # numpy order: rows last-but-one, the row length last
        n = int(np.prod(dims))
        if ggml_type.name in PLAIN:
            data = np.frombuffer(self._map, dtype=PLAIN[ggml_type.name], count=n, offset=offset).reshape(shape)
        else:
            block, size = gguf.GGML_QUANT_SIZES[ggml_type]
            data = np.frombuffer(self._map, dtype=np.uint8, count=n * size // block, offset=offset)
            data = data.reshape(gguf.quants.quant_shape_to_byte_shape(shape, ggml_type))
        return Tensor(name, ggml_type, tuple(dims), data)
