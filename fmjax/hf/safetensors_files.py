"""safetensors files, read and written one tensor at a time.

The format: an 8-byte little-endian header length, a JSON header (each
tensor's dtype, shape and byte range; 8-byte aligned), then the bytes. A
large model is split into several files named in `model.safetensors.index.json`.

fmjax reads and writes it itself because the `safetensors` package can neither
return bfloat16 as numpy arrays nor write a file tensor by tensor: `Writer`
writes each file's header first (the names, dtypes and shapes are known up
front), then every tensor as it comes; `Reader.get` reads one tensor's bytes.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np


class FormatError(ValueError):
  """A checkpoint directory fmjax cannot read or convert. The message is one line."""


DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
CODES = {v: k for k, v in DTYPES.items()}
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def _header(specs: list[tuple[str, np.dtype, tuple]]) -> bytes:
  meta, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, dtype, shape in specs:
    size = math.prod(shape) * dtype.itemsize
    meta[name] = {"dtype": CODES[dtype], "shape": list(shape),
                  "data_offsets": [offset, offset + size]}
    offset += size
  text = json.dumps(meta, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
  return len(text).to_bytes(8, "little") + text


class Writer:
  """Writes tensors in a fixed order into safetensors files of at most `max_bytes` each.

  The names, dtypes and shapes are known up front, so each file's header is
  written first and every tensor goes to disk as soon as it is given.
  """

  def __init__(self, directory: str, specs: list[tuple[str, np.dtype, tuple]], max_bytes: int):
    self.directory = directory
    shards, size = [[]], 0
    for spec in specs:
      nbytes = math.prod(spec[2]) * spec[1].itemsize
      if shards[-1] and size + nbytes > max_bytes:
        shards.append([])
        size = 0
      shards[-1].append(spec)
      size += nbytes
    n = len(shards)
    self.files = [WEIGHTS] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                                            for k in range(n)]
    self.shards = shards
    self.total = sum(math.prod(s[2]) * s[1].itemsize for s in specs)
    self._next = iter([(k, j) for k, shard in enumerate(shards) for j in range(len(shard))])
    self._file, self._open = None, -1

  def write(self, name: str, x: np.ndarray):
    k, j = next(self._next)
    want = self.shards[k][j]
    if (name, x.dtype, x.shape) != want:
      raise AssertionError(f"wrote {name} {x.dtype} {x.shape}, expected {want}")
    if k != self._open:
      if self._file:
        self._file.close()
      self._file = open(os.path.join(self.directory, self.files[k]), "wb")
      self._file.write(_header(self.shards[k]))
      self._open = k
    np.ascontiguousarray(x).tofile(self._file)

  def close(self):
    if self._file:
      self._file.close()
    if len(self.files) > 1:
      weight_map = {s[0]: f for f, shard in zip(self.files, self.shards) for s in shard}
      with open(os.path.join(self.directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)


class Reader:
  """The tensors of an HF directory (one model.safetensors, or shards with an index).

  `get` reads one tensor from disk into memory (no mapping, so memory holds
  only what is asked for).
  """

  def __init__(self, directory: str):
    self.directory = directory
    single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, INDEX)
    if os.path.isfile(index):
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise FormatError(f"{index} has no weight_map")
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
      files = [WEIGHTS]
    else:
      raise FormatError(f"no {WEIGHTS} or {INDEX} in {directory}")
    self.entries = {name: (file,) + entry  # name -> (file, dtype code, shape, absolute offset)
                    for file in files
                    for name, entry in _read_header(os.path.join(directory, file)).items()}
    if os.path.isfile(index):
      for name, file in weight_map.items():
        if self.entries.get(name, (file,))[0] != file:
          raise FormatError(f"{index} puts {name} in {file}, but that file does not hold it")

  def names(self) -> set[str]:
    return set(self.entries)

  def shape(self, name: str) -> tuple:
    return self.entries[name][2]

  def get(self, name: str) -> np.ndarray:
    file, code, shape, offset = self.entries[name]
    with open(os.path.join(self.directory, file), "rb") as f:
      f.seek(offset)
      x = np.fromfile(f, DTYPES[code], math.prod(shape))
    return x.reshape(shape)


def _read_header(path: str) -> dict:
  """name -> (dtype code, shape, offset of its bytes in the file), checked against the file size."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if not 0 < n <= size - 8:
        raise ValueError(f"header length {n} does not fit the file's {size} bytes")
      header = json.loads(f.read(n))
    out = {}
    for name, e in header.items():
      if name == "__metadata__":
        continue
      begin, end = e["data_offsets"]
      shape = tuple(int(d) for d in e["shape"])
      item = DTYPES[e["dtype"]].itemsize if e["dtype"] in DTYPES else None
      if end > size - 8 - n or begin > end or (item and end - begin != math.prod(shape) * item):
        raise ValueError(f"tensor {name} has bytes [{begin}, {end}) that do not fit its shape "
                         f"{list(shape)} or the file (truncated?)")
      out[name] = (e["dtype"], shape, 8 + n + begin)
    return out
  except FileNotFoundError:
    raise FormatError(f"{path} is missing") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise FormatError(f"{path} is not a readable safetensors file "
                      f"({type(e).__name__}: {_first_line(e)})") from None


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      out = json.load(f)
    if not isinstance(out, dict):
      raise ValueError("not a JSON object")
    return out
  except FileNotFoundError:
    raise FormatError(f"no {os.path.basename(path)} in {os.path.dirname(path)}") from None
  except (OSError, ValueError) as e:
    raise FormatError(f"{path} is unreadable ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [""])[0][:200]
