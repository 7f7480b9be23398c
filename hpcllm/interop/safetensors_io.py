"""The safetensors format, read and written with the standard library and torch only.

A file is an 8-byte little-endian header length, a JSON header (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, offsets relative to the end of
the header) and the tensors' raw little-endian bytes. Export must not need ``transformers``
(or the ``safetensors`` package) on the machine that holds the checkpoint, hence this module.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from hpcllm.errors import HpcllmError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
#: headers above this are not safetensors files (the format caps them at 100 MB)
MAX_HEADER = 100 * 1000 * 1000


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_file(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU, any layout: made contiguous) to ``path`` (the caller makes it atomic)."""
    header, offset, order = {}, 0, sorted(tensors)
    for name in order:
        t = tensors[name]
        if t.dtype not in NAMES:
            raise HpcllmError(f"{name}: dtype {t.dtype} has no safetensors name")
        n = tensor_bytes(t)
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def read_header(path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset of the data); a one-line error for a file
    that is not safetensors or is cut short."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HpcllmError(f"{p}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise HpcllmError(f"{p}: not a safetensors file (header length {n} for a {size}-byte file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise HpcllmError(f"{p}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HpcllmError(f"{p}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise HpcllmError(f"{p}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, e in header.items():
        ok = (isinstance(e, dict) and e.get("dtype") in DTYPES and isinstance(e.get("shape"), list)
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2)
        if not ok:
            raise HpcllmError(f"{p}: tensor {name}: malformed header entry {str(e)[:80]}")
        b, end = e["data_offsets"]
        numel = 1
        for s in e["shape"]:
            numel *= int(s)
        if not 0 <= b <= end <= data or end - b != numel * torch.empty(0, dtype=DTYPES[e["dtype"]]).element_size():
            raise HpcllmError(f"{p}: tensor {name}: bytes {b}-{end} do not fit shape {e['shape']} {e['dtype']} "
                              f"in {data} data bytes (a truncated file?)")
    return header, 8 + n


class SafetensorsFile:
    """Tensors of one file by name, memory-mapped (read on access, copied out)."""

    def __init__(self, path):
        self.path = Path(path)
        self.header, self.base = read_header(self.path)
        self._f = open(self.path, "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else None

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> torch.Tensor:
        e = self.header[name]
        b, end = e["data_offsets"]
        dtype = DTYPES[e["dtype"]]
        raw = bytearray(self._mm[self.base + b:self.base + end]) if end > b else bytearray()
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return t.reshape(e["shape"])

    def close(self):
        if self._mm is not None:
            self._mm.close()
        self._f.close()
