"""Device mesh and the ONE table that maps logical axis names to mesh axes.

Parameters are tagged with logical names in the model (`embed`, `mlp`, `vocab`, ...); activations
with `act_*` names. `LOGICAL_RULES` decides where each lives on the ('data', 'fsdp', 'tensor') mesh:
weights are sharded on `embed` over `fsdp` at rest (FSDP) and on `mlp`/`heads`/`vocab` over `tensor`
(tensor parallelism); input batches are split by rows over both `data` and `fsdp`, and inside the
model the activations by rows over `data` and by sequence over `fsdp` (compiled under
`mesh_rules`, as train.py does).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes, or None = replicated). A mesh axis goes to at most one
# dimension of an array: to the dimension whose name comes first in this table (so
# [embed, mlp] -> P('fsdp', 'tensor'), but [mlp, vocab] -> P(None, 'tensor')).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("patches", None),
    ("codebook", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    # activations: rows over `data`, the sequence over `fsdp` (attention gathers its keys and values
    # along it). Janus-Pro-7B stage 2 compiled for 256 devices (data 16 x fsdp 16, batch 512 x
    # 4096, benchmarks/training.py): 29.7 GiB per device (33.8 with the earlier attention form);
    # with that earlier form, rows over (data, fsdp) instead: 94.0 GiB, as the partitioner
    # all-gathers the layer scan's saved activations over the whole mesh; with no activation
    # constraints (propagation alone): 68.2 GiB.
    ("act_batch", "data"),
    ("act_seq", "fsdp"),
    ("act_images", ("data", "fsdp")),  # the understanding encoder's images, before [B, N, W]
    ("act_embed", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one entry may be -1 (all remaining devices).

  Axes are `Auto` (classic GSPMD propagation): jax 0.10's default `Explicit` axes reject
  the ambiguous contractions of a sharded backward pass.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape) if isinstance(shape, (tuple, list)) else [shape]
  if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool)
                                and (n >= 1 or n == -1) for n in shape):
    raise ValueError(f"mesh shape {tuple(shape)} (config.mesh) must be 3 integers for axes "
                     f"{MESH_AXES}, each >= 1 or -1 (all remaining devices)")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"but {len(devices)} are available")
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """A tree of `nn.LogicallyPartitioned` boxes (or PartitionSpecs of logical names) -> NamedShardings."""
  specs = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def param_shardings(abstract_boxed_params: Any, mesh: Mesh) -> Any:
  """NamedShardings for params, optimizer state or a whole train state, from an abstract tree
  whose parameter leaves are logically partitioned boxes (optax states keep the boxes); leaves
  without names (step counters, RNG keys) are replicated.

  A dimension that the mesh axes do not divide is replicated instead (small test models); for a
  leaf of at least WARN_REPLICATED_ELEMENTS elements that is logged, as it costs real memory.
  """
  shardings = logical_to_sharding(abstract_boxed_params, mesh)
  shapes = nn.unbox(abstract_boxed_params)
  return jax.tree_util.tree_map_with_path(
      lambda path, s, x: _divisible_or_replicated(s, x.shape, mesh, jax.tree_util.keystr(path)),
      shardings, shapes)


# 16 M elements: 64 MB in float32, far above any norm scale or bias of the released models.
WARN_REPLICATED_ELEMENTS = 1 << 24


def _divisible_or_replicated(sharding: NamedSharding, shape, mesh: Mesh,
                             name: str = "") -> NamedSharding:
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for i, axes in enumerate(spec):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[n] for n in names]))
    if shape[i] % size:
      spec[i] = None
      if np.prod(shape) >= WARN_REPLICATED_ELEMENTS:
        logging.warning("%s %s: dimension %d (%d) is not divisible by mesh axes %s (%d "
                        "devices), so it is replicated instead of sharded", name, tuple(shape),
                        i, shape[i], names, size)
  return NamedSharding(mesh, PartitionSpec(*spec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """(shard index, shard count): this process holds rows [i * n, (i + 1) * n) of a global batch
  under `batch_sharding`, n = batch_size / count. Processes whose devices differ only along
  `tensor` hold the same rows (count < process_count), so they must read the same shard."""
  index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,))
  blocks = sorted({sl[0].indices(batch_size)[:2] for sl in index_map.values()})
  start, stop = blocks[0][0], blocks[-1][1]
  if any(a[1] != b[0] for a, b in zip(blocks, blocks[1:])) or start % (stop - start):
    raise ValueError(f"mesh {dict(mesh.shape)} (config.mesh) gives process {jax.process_index()} "
                     f"the batch rows {blocks}, not one aligned block of the {batch_size}: "
                     "order the devices so that each host's devices are adjacent along "
                     f"{BATCH_AXES}")
  return start // (stop - start), batch_size // (stop - start)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def axis_rules():
  """Context manager that makes the model's `nn.with_logical_constraint` calls bind to the mesh."""
  return nn.logical_axis_rules(list(LOGICAL_RULES))


@contextlib.contextmanager
def mesh_rules(mesh: Mesh) -> Iterator[None]:
  """The context to trace and compile a step in: `mesh` as the context mesh (`jax.set_mesh`) plus
  `axis_rules`, so that the model's activation constraints (`nn.with_logical_constraint`) bind
  to it. flax 0.12 reads only the context mesh `jax.set_mesh` sets: under the legacy `with mesh:`
  they are silently dropped. train.py and the AOT benchmark compile the same program in it."""
  with jax.set_mesh(mesh), axis_rules():
    yield
