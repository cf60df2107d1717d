"""Converted checkpoint directories: writing them atomically, and `load_pretrained`.

A converted directory holds
  params/            orbax checkpoint of the params (stacked layers, our layout)
  config.json        {"model": our model config, "family": "janus" | "janus_pro", "source": ...}
  tokenizer files    tokenizer.json or *.model, tokenizer_config.json, special_tokens_map.json, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Any

import flax
import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from janus_jax import convert, sharding
from janus_jax.models import janus as janus_lib

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "processor_config.json", "preprocessor_config.json", "tokenizer.model",
              "generation_config.json")
CONVERTED_MARKER = "params"


@dataclasses.dataclass
class Pretrained:
  model: janus_lib.Janus
  params: Any
  config: ml_collections.ConfigDict
  tokenizer: Any
  processor: Any
  family: str


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: not found") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from e


def detect_family(directory: str) -> str:
  """Janus-Pro's templates use the special role tokens `<|User|>`; Janus-1.3B plain `User`."""
  specials = os.path.join(directory, "special_tokens_map.json")
  if os.path.exists(specials):
    extra = read_json(specials).get("additional_special_tokens", [])
    names = [t if isinstance(t, str) else t.get("content", "") for t in extra]
    return "janus_pro" if "<|User|>" in names else "janus"
  return "janus_pro"


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"janus_jax atomic_directory: {tag}")


# Every directory atomic_directory writes holds this file, so that --overwrite replaces only what
# this library wrote: never a PyTorch checkpoint, a source tree or a directory of someone's files.
OUTPUT_MARKER = ".janus_jax_output"


def _ours(directory: str) -> bool:
  """Empty, or written by this library (the marker; before it, a converted directory or a
  stage-0 output: params/ beside metrics.json)."""
  names = os.listdir(directory)
  if not names or OUTPUT_MARKER in names or {CONVERTED_MARKER, "metrics.json"} <= set(names):
    return True
  try:
    with open(os.path.join(directory, "config.json")) as f:
      return CONVERTED_MARKER in names and "model" in json.load(f)
  except (OSError, ValueError):
    return False


def _check_replaceable(dst: str, keep: tuple[str, ...]) -> None:
  real_dst = os.path.realpath(dst)  # an input reached through a symlink into dst counts too
  for path in keep:
    if os.path.commonpath([real_dst, os.path.realpath(path)]) == real_dst:
      raise ValueError(f"refusing to write {dst}: it is (or contains) the input {path}")
  if not os.path.isdir(dst):
    raise FileExistsError(f"{dst} exists and is not a directory; remove it or choose another")
  if not _ours(dst):
    raise FileExistsError(f"{dst} exists and was not written by janus_jax (no {OUTPUT_MARKER}); "
                          "--overwrite replaces only janus_jax outputs: remove it by hand or "
                          "choose another destination")


def _umask_mode() -> int:
  """0o777 less the process umask, read without setting it (os.umask would, for a moment, for
  every thread)."""
  try:
    with open("/proc/self/status") as f:
      mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
  except (OSError, StopIteration, ValueError):
    mask = os.umask(0o022)
    os.umask(mask)
  return 0o777 & ~mask


def check_destination(dst: str, overwrite: bool, keep: tuple[str, ...] = ()) -> str:
  """dst as an absolute path; raises unless atomic_directory may write it (see there). Call it
  before expensive work too, so a bad destination fails in seconds."""
  dst = os.path.abspath(dst)
  if jax.process_count() == 1:  # a killed writer's hidden dst is back before dst is judged
    _clear_leftovers(dst)
  if os.path.exists(dst):
    if not overwrite:
      raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    _check_replaceable(dst, keep)
  return dst


def _owner_tag() -> str:
  """host-pid, in the names of this process's temporary siblings (`_clear_leftovers`)."""
  host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
  return f"{host}-{os.getpid()}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _clear_leftovers(dst: str) -> None:
  """Removes the siblings of dst that a killed writer on this host left (kill -9, power loss).

  Only names atomic_directory makes for this dst, tagged with this host and a pid no longer
  alive, are touched (a live or other-host writer may still be filling its own). A writer
  killed between its two renames left the previous dst in `.old-*/x` and no dst: it is put
  back, not deleted."""
  parent, base = os.path.split(dst)
  host = _owner_tag().rsplit("-", 1)[0]
  pattern = re.compile(rf"\.{re.escape(base)}\.(tmp|old)-{re.escape(host)}-(\d+)-[A-Za-z0-9_]+")
  try:
    names = os.listdir(parent)
  except FileNotFoundError:
    return
  for name in sorted(names, key=lambda n: ".old-" not in n):  # restores before removals
    match = pattern.fullmatch(name)
    if not match or _alive(int(match.group(2))):
      continue
    path = os.path.join(parent, name)
    if match.group(1) == "old" and not os.path.lexists(dst) and os.path.isdir(os.path.join(path, "x")):
      os.rename(os.path.join(path, "x"), dst)
      print(f"restored {dst} from {path}, left by a writer that was killed mid-replace")
    elif match.group(1) == "tmp" and os.listdir(path) and not os.path.exists(
        os.path.join(path, OUTPUT_MARKER)):
      continue  # neither empty nor marked: not atomic_directory's, leave it
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(dst: str, overwrite: bool = True, keep: tuple[str, ...] = ()):
  """Yields a temporary sibling of dst to fill; on success it replaces dst in one rename, on any
  failure it is removed and dst is left as it was: a half-written directory never appears.

  An existing dst is replaced only with `overwrite`, and only if it is empty or janus_jax wrote
  it (OUTPUT_MARKER), and never when it is or contains one of the `keep` paths (the inputs).
  With several processes (multi-host), every process gets the same temporary path (orbax's
  collective save needs one), and only process 0 creates, renames or removes it."""
  dst = check_destination(dst, overwrite, keep)  # (clears a killed writer's leftovers first)
  parent = os.path.dirname(dst)
  primary = jax.process_index() == 0
  if jax.process_count() > 1:
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-multihost")
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt's leftovers
      os.makedirs(tmp)
    _sync(f"{tmp} created")
  else:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-{_owner_tag()}-", dir=parent)
  try:
    if primary:
      os.chmod(tmp, _umask_mode())  # mkdtemp's 0700 would survive the rename
      open(os.path.join(tmp, OUTPUT_MARKER), "w").close()
    yield tmp
    _sync(f"{tmp} written")
    if primary and os.path.exists(dst):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-{_owner_tag()}-", dir=parent)
      try:
        os.rename(dst, os.path.join(old, "x"))
      except BaseException:
        os.rmdir(old)
        raise
      try:
        os.rename(tmp, dst)
      except BaseException:
        os.rename(os.path.join(old, "x"), dst)  # put the good one back
        os.rmdir(old)
        raise
      shutil.rmtree(old, ignore_errors=True)
    elif primary:
      os.rename(tmp, dst)
    _sync(f"{dst} in place")
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise


def copy_side_files(src: str | None, dst: str) -> None:
  """Tokenizer and processor files travel with the weights."""
  for name in os.listdir(src) if src else ():
    if name in SIDE_FILES or name.endswith(".model"):
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def write_converted(dst: str, params: Any, model_config: ml_collections.ConfigDict, family: str,
                    src: str | None, overwrite: bool, extra: dict[str, Any] | None = None) -> None:
  """Build everything in a temporary sibling of dst, then rename: dst is never half-written.

  src: where the tokenizer files come from (copied before the rename, so it may be dst)."""
  with atomic_directory(dst, overwrite) as tmp:
    # Synchronous, with at most 1 GB in flight: the default async save stages a host copy of
    # every array at once, which would double peak memory on a 7B conversion.
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=1))
    checkpointer.save(os.path.join(tmp, CONVERTED_MARKER), args=ocp.args.StandardSave(params))
    if jax.process_index() == 0:  # one writer for the small files
      meta = {"model": model_config.to_dict(), "family": family, "source": src, **(extra or {})}
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(meta, f, indent=2, default=list)
      copy_side_files(src, tmp)


def _model_config_from_meta(meta: dict[str, Any]) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(meta["model"])
  cfg.vq.channel_multipliers = tuple(cfg.vq.channel_multipliers)
  return cfg


def restore_params(directory: str, model: janus_lib.Janus, mesh=None) -> Any:
  """Params of a converted directory in the model's param dtype, on mesh (or the default device)."""
  abstract = janus_lib.abstract_params(model)
  if mesh is not None:
    shardings = sharding.param_shardings(abstract, mesh)
  else:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                             nn.unbox(abstract))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(abstract), shardings)
  path = os.path.join(os.path.abspath(directory), CONVERTED_MARKER)
  checkpointer = ocp.StandardCheckpointer()
  _check_stored_shapes(path, checkpointer.metadata(path).item_metadata.tree, target)
  return checkpointer.restore(path, target)


def _check_stored_shapes(path: str, stored: Any, target: Any) -> None:
  """Raises naming the parameter when the stored params are not the model's (another size)."""
  want = flax.traverse_util.flatten_dict(target)
  have = flax.traverse_util.flatten_dict(stored)
  for key in sorted(set(want) | set(have)):
    name = "/".join(key)
    if key not in have:
      raise ValueError(f"{path}: no parameter {name} (the model config expects it)")
    if key not in want:
      raise ValueError(f"{path}: parameter {name} is not in the model (another architecture?)")
    if tuple(have[key].shape) != tuple(want[key].shape):
      raise ValueError(f"{path}: parameter {name} is stored with shape {tuple(have[key].shape)}, "
                       f"the model expects {tuple(want[key].shape)} (a checkpoint of another "
                       "model size?)")


def _load_side(directory: str, family: str, model_config, system_prompt: str | None = None):
  from janus_jax import processing, tokenizer  # imported here: optional files for bare params

  tok = tokenizer.Tokenizer.from_dir(directory)
  num_und = (model_config.vision.image_size // model_config.vision.patch_size) ** 2
  proc = processing.Processor(
      tok, family, image_size=model_config.vision.image_size, num_image_tokens=num_und,
      system_prompt=processing.SYSTEM_PROMPT if system_prompt is None else system_prompt)
  return tok, proc


def load_pretrained(path: str, dtype: str | None = None, mesh=None, with_tokenizer: bool = True
                    ) -> Pretrained:
  """A converted directory, or a PyTorch checkpoint directory converted on the fly (in memory).

  dtype: parameter dtype ("bfloat16" / "float32"; default: as stored). The model computes in
  the same dtype. mesh: place params by the sharding rules.
  """
  path = os.path.abspath(path)
  meta = read_json(os.path.join(path, "config.json"))
  if os.path.isdir(os.path.join(path, CONVERTED_MARKER)) and "model" in meta:
    cfg = _model_config_from_meta(meta)
    family = meta.get("family", "janus_pro")
    if dtype:
      cfg.dtype = cfg.param_dtype = dtype
    model = janus_lib.build(cfg)
    params = restore_params(path, model, mesh)
  else:
    place = None
    if mesh is not None:  # the shardings depend on the shapes only
      shardings = flax.traverse_util.flatten_dict(sharding.param_shardings(janus_lib.abstract_params(
          janus_lib.build(convert.model_config_from_json(meta, os.path.join(path, "config.json")))),
          mesh))
      place = lambda path_, leaf: jax.device_put(leaf, shardings[path_])  # noqa: E731
    cfg, params = convert.convert_directory(path, dtype, place)
    model = janus_lib.build(cfg)
    family = detect_family(path)
  system_prompt = meta.get("system_prompt") if "model" in meta else None
  tok, proc = _load_side(path, family, cfg, system_prompt) if with_tokenizer else (None, None)
  return Pretrained(model, params, cfg, tok, proc, family)
