"""Reading and writing PyTorch checkpoint files without torch and without running their code.

- safetensors: parsed directly (8-byte header length, JSON header, raw little-endian bytes), so
  bfloat16 works through ml_dtypes and every tensor is read on its own (no mmap: pages of a mapped
  file would count toward resident memory).
- `.bin` (torch zip pickles): a restricted unpickler that knows only the handful of globals a
  state dict needs (OrderedDict, `_rebuild_tensor_v2`, typed storages). Anything else — e.g. a
  pickle that would call `os.system` — is refused with `UnsafeCheckpointError` before any of it runs.
  Tensors come back lazy: their bytes are read from the archive only when asked for.
- Sharded checkpoints: `*.index.json` with a `weight_map`.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
_TORCH_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class UnsafeCheckpointError(pickle.UnpicklingError):
  """A pickle asked for something a plain state dict never needs."""


class CorruptCheckpointError(ValueError):
  pass


# ---------------------------------------------------------------------------------------------
# safetensors

def _safetensors_header(path: str) -> tuple[dict[str, Any], int]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CorruptCheckpointError(f"{path}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise CorruptCheckpointError(f"{path}: truncated or corrupt safetensors header ({n} bytes "
                                   f"announced, file has {size})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CorruptCheckpointError(f"{path}: corrupt safetensors header: {e}") from e
  if not isinstance(header, dict):
    raise CorruptCheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
  header.pop("__metadata__", None)
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
  for key, info in header.items():
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if (not isinstance(info, dict) or not isinstance(info.get("dtype"), str)
        or not isinstance(info.get("shape"), list) or not all(map(is_int, info["shape"]))
        or not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_int, offsets))
        or offsets[0] > offsets[1]):
      raise CorruptCheckpointError(f"{path}: corrupt safetensors header entry for {key!r}: "
                                   f"{str(info)[:200]} (needs a dtype string, a shape of "
                                   "non-negative ints and two ordered int data_offsets)")
  end = max((v["data_offsets"][1] for v in header.values()), default=0)
  if 8 + n + end > size:
    raise CorruptCheckpointError(f"{path}: truncated safetensors file ({size} bytes, tensors "
                                 f"need {8 + n + end})")
  return header, 8 + n


class SafetensorsFile:
  """Random access to the tensors of one .safetensors file, each read on demand."""

  def __init__(self, path: str):
    self.path = path
    self.header, self._data_start = _safetensors_header(path)

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def dtype(self, key: str) -> np.dtype | None:
    return (np.dtype(SAFETENSORS_DTYPES[self.header[key]["dtype"]])
            if self.header[key]["dtype"] in SAFETENSORS_DTYPES else None)

  def __getitem__(self, key: str) -> np.ndarray:
    info = self.header[key]
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise CorruptCheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    with open(self.path, "rb") as f:
      f.seek(self._data_start + start)
      buf = f.read(end - start)
    dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
    if len(buf) != end - start or (end - start) != dtype.itemsize * int(np.prod(info["shape"])):
      raise CorruptCheckpointError(f"{self.path}: tensor {key!r} has {len(buf)} bytes, "
                                   f"expected {dtype.itemsize * int(np.prod(info['shape']))}")
    return np.frombuffer(bytearray(buf), dtype).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes tensors in order, one at a time (values may be callables returning the array)."""
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset, arrays = 0, {}
  for key, value in tensors.items():
    shape, dtype = (value.shape, value.dtype) if not callable(value) else value(meta=True)
    nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))
    header[key] = {"dtype": _DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                   "data_offsets": [offset, offset + nbytes]}
    arrays[key] = value
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for key, value in arrays.items():
      arr = value() if callable(value) else value
      f.write(np.ascontiguousarray(arr).tobytes())


# ---------------------------------------------------------------------------------------------
# torch zip pickles

class LazyTensor:
  """A tensor of a torch zip checkpoint whose bytes are read only by `load()`."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, storage, offset: int, shape, stride):
    self._archive, self._prefix = archive, prefix
    self._storage_key, self.dtype, self._numel = storage
    self._offset, self.shape, self._stride = offset, tuple(shape), tuple(stride)

  def load(self) -> np.ndarray:
    name = f"{self._prefix}/data/{self._storage_key}"
    try:
      raw = self._archive.read(name)
    except (KeyError, zipfile.BadZipFile, EOFError, OSError) as e:
      raise CorruptCheckpointError(f"{self._archive.filename}: cannot read {name}: {e}") from e
    dtype = np.dtype(self.dtype)
    storage = np.frombuffer(bytearray(raw), dtype)
    if storage.size < self._numel:
      raise CorruptCheckpointError(f"{self._archive.filename}: storage {name} is truncated")
    last = self._offset + sum((n - 1) * st for n, st in zip(self.shape, self._stride))
    if min(self.shape, default=1) > 0 and (min(self._stride, default=0) < 0 or self._offset < 0
                                           or last >= storage.size):
      raise CorruptCheckpointError(
          f"{self._archive.filename}: storage {name} holds {storage.size} values but the tensor "
          f"(offset {self._offset}, shape {tuple(self.shape)}, stride {tuple(self._stride)}) "
          "reads past them")
    if not self.shape:
      return storage[self._offset].copy()
    view = np.lib.stride_tricks.as_strided(
        storage[self._offset:], self.shape, [s * dtype.itemsize for s in self._stride])
    return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
  del requires_grad, hooks, metadata
  archive, prefix, storage_info = storage
  return LazyTensor(archive, prefix, storage_info, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """An nn.Parameter (`state_dict(keep_vars=True)`): its tensor, which is all a state dict needs."""
  del requires_grad, backward_hooks
  if not isinstance(data, LazyTensor):
    raise UnsafeCheckpointError(f"a parameter wraps {type(data).__name__}, not a tensor")
  return data


class _StateDictUnpickler(pickle.Unpickler):
  _ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
              ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
              ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
    super().__init__(file)
    self._archive, self._prefix, self._source = archive, prefix, source

  def find_class(self, module: str, name: str):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == "torch" and name in _TORCH_STORAGES:
      return ("storage_type", _TORCH_STORAGES[name])
    raise UnsafeCheckpointError(
        f"{self._source}: refusing to load: the pickle asks for {module}.{name}, which a "
        "state dict never needs (it could run code). Convert the file with a trusted tool first.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) == 5):
      raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if not (isinstance(storage_type, tuple) and storage_type[0] == "storage_type"):
      raise UnsafeCheckpointError(f"{self._source}: unexpected storage type {storage_type!r}")
    return (self._archive, self._prefix, (str(key), storage_type[1], int(numel)))


def load_torch_pickle(path: str) -> dict[str, LazyTensor]:
  """A torch zip checkpoint (`torch.save` since 1.6) as {key: LazyTensor}, without torch."""
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CorruptCheckpointError(f"{path}: not a torch zip checkpoint (truncated or corrupt, or the "
                                 f"legacy pre-1.6 format): {e}") from e
  pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
  if len(pkl) != 1:
    raise CorruptCheckpointError(f"{path}: expected one data.pkl in the archive, found {pkl}")
  prefix = pkl[0][: -len("/data.pkl")] if "/" in pkl[0] else ""
  with archive.open(pkl[0]) as f:
    try:
      state = _StateDictUnpickler(f, archive, prefix, path).load()
    except UnsafeCheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
      raise CorruptCheckpointError(f"{path}: corrupt pickle: {e}") from e
  if not isinstance(state, dict) or not all(isinstance(v, LazyTensor) for v in state.values()):
    raise CorruptCheckpointError(f"{path}: the pickle is not a flat state dict of tensors")
  return dict(state)


# ---------------------------------------------------------------------------------------------
# a checkpoint directory

class TensorSource:
  """All tensors of a checkpoint directory (single file or index + shards), read one at a time."""

  def __init__(self, directory: str):
    self.directory = directory
    self._where: dict[str, tuple[str, Any]] = {}
    index, weight_map = self._index()
    files = sorted(set(weight_map.values())) if index else self._single_file()
    handles = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: weight file {name} (named in the index) is missing")
      handles[name] = (SafetensorsFile(path) if name.endswith(".safetensors")
                       else load_torch_pickle(path))
    # With an index, each tensor comes from the shard the index names; a tensor in no entry is
    # read from the one shard holding it (two holding it is ambiguous).
    for name, handle in handles.items():
      for key in handle.keys():
        assigned = weight_map.get(key)
        if assigned == name or (assigned is None and key not in self._where):
          self._where[key] = (name, handle)
        elif assigned is None:
          raise CorruptCheckpointError(f"{directory}: tensor {key!r} is in both "
                                       f"{self._where[key][0]} and {name}, and {index} names "
                                       "neither")
    lost = sorted(k for k in weight_map if k not in self._where)
    if lost:
      raise CorruptCheckpointError(
          f"{os.path.join(directory, index)}: {len(lost)} tensors are not in the shard it names "
          f"for them, e.g. {lost[0]!r} (index: {weight_map[lost[0]]})")

  def _index(self) -> tuple[str | None, dict[str, str]]:
    """(index file name, its weight_map {key: shard file}), or (None, {}) without one."""
    for index in INDEX_FILES:
      path = os.path.join(self.directory, index)
      if os.path.exists(path):
        try:
          with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise CorruptCheckpointError(f"{path}: not a valid index (needs 'weight_map'): {e}") from e
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
          raise CorruptCheckpointError(f"{path}: 'weight_map' must map tensor names to file names")
        return index, weight_map
    return None, {}

  def _single_file(self) -> list[str]:
    for name in WEIGHT_FILES:
      if os.path.exists(os.path.join(self.directory, name)):
        return [name]
    raise FileNotFoundError(f"{self.directory}: no weights found (looked for {', '.join(WEIGHT_FILES + INDEX_FILES)})")

  def dtype(self, key: str) -> np.dtype | None:
    """The stored dtype of a tensor (None if this reader does not support it)."""
    name, handle = self._where[key]
    return handle.dtype(key) if isinstance(handle, SafetensorsFile) else np.dtype(handle[key].dtype)

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def describe(self, key: str) -> str:
    """The key and the file that holds it, for error messages."""
    return f"{key!r} (in {self._where[key][0]})" if key in self._where else repr(key)

  def shape(self, key: str) -> tuple[int, ...]:
    name, handle = self._where[key]
    return handle.shape(key) if isinstance(handle, SafetensorsFile) else handle[key].shape

  def __getitem__(self, key: str) -> np.ndarray:
    name, handle = self._where[key]
    return handle[key] if isinstance(handle, SafetensorsFile) else handle[key].load()

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for key in self._where:
      yield key, self[key]
