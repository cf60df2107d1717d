"""The training input pipeline: tfds datasets -> mixed task streams -> packed rows -> batches.

    it = make_pipeline(config.data, tokenizer, "janus_pro", seed=0, mixture=(5, 1, 4),
                       batch_size=8, image_tokenizer=vq_encode,
                       shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(it)          # dict of numpy arrays, the layout below
    state = it.get_state()    # JSON-able; it.set_state(state) resumes exactly
    it.close()                # when done: stops the batch_prefetch thread
    # or with orbax: grain.checkpoint.CheckpointSave(it) / CheckpointRestore(it)

Data config (`default_config()`; missing fields take these defaults):
  seq_len 4096               T, tokens per row
  pack True                  pack several examples per row (False: one example per row, padded)
  max_images_per_row 4       I, understanding-image slots per row
  cfg_drop 0.1               probability a generation caption is replaced by pad ids
  image_size 384             understanding image side (pad-to-square recipe)
  gen_image_size 384         generation image side (short-side resize + centre crop)
  num_image_tokens_und 576   placeholders per understanding image
  num_image_tokens_gen 576   N, VQ tokens per generated image
  system_prompt None         None: processing.SYSTEM_PROMPT ("" for none)
  caption_prompt "Describe this image in detail."  the question for image-caption und. data
  und_max_shift 0            augmentation: understanding images move by a random offset of up to
                             this many pixels each way (edges repeated); 0 = off
  und_max_rotation 0.0       ... and rotate by up to this many degrees each way, and
  und_max_scale 0.0          scale by 1 +- this (bilinear; transforms.random_affine); 0 = off
  shuffle True               shuffle each source (reshuffled every epoch); sources repeat forever
  vq_batch 16                images per image_tokenizer call (a fixed shape)
  image_codebook_size 0      the VQ's codebook size: stored VQ ids (pretokenized_key) at or above
                             it are refused, naming the dataset; 0 = unchecked
  read_threads 4, prefetch 16   grain ReadOptions per source (0 threads: read inline)
  batch_prefetch 2           batches made ahead in a background thread (mixing, VQ encoding,
                             packing, batching overlap the train step); 0 = in the caller
  sources.{understanding,text,generation}: each
    name       tfds name ("image_captions/cc", "mnist", ...), read from data_dir
    split      "train" (any tfds split string)
    data_dir   None: the tfds default
    features   logical key -> dataset key; defaults per task:
               understanding {"messages": "messages", "images": "images"} (chat; "images" may
               be None) or {"image": ..., "caption": ...} (caption pairs asked caption_prompt);
               text {"text": "text"}; generation {"image": "image", "caption": "caption"}
    pretokenized_key  generation only: a feature of N stored VQ ids (then "image" is unused
               and no image_tokenizer is needed)
The mixture weights (understanding, text, generation) are passed separately; they are example
proportions, interleaved deterministically; a source with weight 0 is not read (nor needed).

Batches (B = batch_size rows, per host): input_ids, targets, segment_ids, positions, task int32
[B, T]; image_token_mask, image_mask, target_is_image, loss_mask bool [B, T]; pixels float32
[B, I, S, S, 3]; image_valid bool [B, I]. Padding: segment id 0, input pad_id, task 0, no loss.
Length policy: see janus_jax.data.transforms. Each host reads the shard_index-th of shard_count
interleaved slices of every source (disjoint), so the batches are per-host and different.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from janus_jax import processing
from janus_jax.data import packing, transforms
from janus_jax.tokenizer import Tokenizer

TASKS = ("understanding", "text", "generation")
DEFAULT_FEATURES = {"understanding": {"messages": "messages", "images": "images"},
                    "text": {"text": "text"},
                    "generation": {"image": "image", "caption": "caption"}}
# A source whose examples are nearly all dropped (too long, too many images) is a configuration
# error: grain raises once this share of a 1,000-example window is filtered out.
_MAX_DROP_RATIO = 0.99


class DatasetError(ValueError):
  """A dataset, split or feature key that the data config names cannot be read."""


# The length policy's drops are counted per source: a warning at 100, 1,000, 10,000, ... examples
# read when at least this share was dropped, and an error when the first _ALL_DROPPED_AFTER
# examples were all dropped (grain itself warns only from 90 % of a 1,000-example window).
_DROP_WARN_SHARE = 0.01
_ALL_DROPPED_AFTER = 200


class _KeepFitting(grain.transforms.Filter):
  """Keeps the examples the length policy kept (a dropped one comes as {}), counting both."""

  def __init__(self, task: str, name: str, layout: transforms.Layout):
    self.task, self.name, self.kept, self.dropped, self._report = task, name, 0, 0, 100
    self.why = (f"longer than seq_len={layout.seq_len}" + (
        f" or with more images than max_images_per_row={layout.max_images}"
        if task == "understanding" else "") + " (janus_jax.data.transforms' length policy)")

  def filter(self, example: Any) -> bool:
    kept = bool(example)
    self.kept, self.dropped = self.kept + kept, self.dropped + (not kept)
    seen = self.kept + self.dropped
    if seen == _ALL_DROPPED_AFTER and not self.kept:
      raise DatasetError(f"{self.task} source {self.name!r}: all of the first {seen} examples "
                         f"were dropped: {self.why}")
    if seen == self._report:
      self._report *= 10
      if self.dropped >= _DROP_WARN_SHARE * seen:
        logging.warning("%s source %r: %d of the first %d examples dropped (%.0f %%): %s",
                        self.task, self.name, self.dropped, seen, 100 * self.dropped / seen,
                        self.why)
    return kept

  def __repr__(self) -> str:
    return f"{self.task} examples of {self.name!r} not {self.why}"


def _with_context(transform: Callable[[int, Any], transforms.Example], task: str, name: str,
                  split: str) -> Callable[[int, Any], transforms.Example]:
  """The transform, its errors naming the source and the example (a corrupt image, a feature
  of the wrong kind) instead of only what failed deep inside."""
  def run(i: int, example: Any) -> transforms.Example:
    try:
      return transform(i, example)
    except DatasetError:
      raise
    except Exception as e:  # noqa: BLE001  # re-raised with the context
      raise DatasetError(f"{task} source {name!r} split {split!r}: example {i} of this host's "
                         f"stream cannot be read: {type(e).__name__}: {e}") from e
  return run


def default_config() -> ml_collections.ConfigDict:
  """The data block with its defaults and no sources."""
  return ml_collections.ConfigDict({
      "seq_len": 4096, "pack": True, "max_images_per_row": 4, "cfg_drop": 0.1,
      "image_size": 384, "gen_image_size": 384, "num_image_tokens_und": 576,
      "num_image_tokens_gen": 576, "system_prompt": None,
      "caption_prompt": "Describe this image in detail.", "und_max_shift": 0,
      "und_max_rotation": 0.0, "und_max_scale": 0.0, "shuffle": True,
      "vq_batch": 16, "image_codebook_size": 0,
      "read_threads": 4, "prefetch": 16, "batch_prefetch": 2,
      "sources": ml_collections.ConfigDict()})


def source_config(name: str, split: str = "train", data_dir: str | None = None,
                  features: Mapping[str, str | None] | None = None,
                  pretokenized_key: str | None = None) -> ml_collections.ConfigDict:
  """One entry of `data.sources`."""
  return ml_collections.ConfigDict({
      # "" (not None): a flag can set it; `is None`, as a FieldReference has no truth value.
      "name": name, "split": split, "data_dir": "" if data_dir is None else data_dir,
      "features": dict(features) if features is not None else None,
      "pretokenized_key": pretokenized_key})


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  value = cfg.get(key, None) if cfg is not None else None
  return default if value is None else value


def _as_dict(value: Any) -> dict[str, Any]:
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _seed(*parts: int) -> int:
  """A uint32 seed mixed from non-negative ints."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ------------------------------------------------------------------------------ opening sources

def _datasets_in(data_dir: str | None) -> list[str]:
  """Names ("name" or "name/config") of the tfds datasets built under data_dir."""
  root = Path(data_dir) if data_dir else None
  if root is None or not root.is_dir():
    return []
  found = {p.parent.parent.relative_to(root).as_posix()
           for p in root.glob("*/*/dataset_info.json")}
  found |= {p.parent.parent.relative_to(root).as_posix()
            for p in root.glob("*/*/*/dataset_info.json")}
  return sorted(found)


def open_builder(name: str, split: str, data_dir: str | None) -> Any:
  """The tfds builder of a built dataset with that split, or a DatasetError saying what is
  there instead."""
  where = f"data_dir {data_dir}" if data_dir else "the default tfds data_dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception as e:  # not registered and not on disk (or a registry lookup failed)
    prepared, cause = False, e
  else:
    cause = None
  if not prepared:
    have = _datasets_in(data_dir)
    raise DatasetError(f"dataset {name!r} is not built in {where}"
                       + (f"; built there: {', '.join(have)}" if have else "")
                       + " (build it first, e.g. with janus_jax.data.builders.build)") from cause
  splits = list(builder.info.splits.keys())
  if split.split("[")[0] not in splits:
    raise DatasetError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(splits)}")
  return builder


def check_features(name: str, available: Sequence[str], wanted: Mapping[str, str | None],
                   task: str) -> None:
  """Every dataset key the config maps to must exist."""
  for logical, key in wanted.items():
    if key is not None and key not in available:
      raise DatasetError(f"dataset {name!r} has no feature {key!r} (the {task} source's "
                         f"{logical!r} key); available keys: {', '.join(sorted(available))}")


class _TfDataIterator(grain.DatasetIterator):
  """(index, example) from tf.data; the state is the count read, replayed on restore."""

  def __init__(self, make: Callable[[int], Any]):
    super().__init__()
    self._make, self._count, self._it = make, 0, None

  def __next__(self) -> tuple[int, Any]:
    if self._it is None:
      self._it = iter(self._make(self._count))
    ex = next(self._it)
    self._count += 1
    return self._count - 1, ex

  def get_state(self) -> dict[str, Any]:
    return {"count": self._count}

  def set_state(self, state: dict[str, Any]) -> None:
    self._count, self._it = int(state["count"]), None


class _TfDataIterDataset(grain.IterDataset):
  """A tfrecord tfds split through tf.data: sharded, shuffled per epoch with a seed, repeated."""

  def __init__(self, builder: Any, split: str, shard: tuple[int, int], seed: int, shuffle: bool):
    super().__init__()
    self._builder, self._split, self._shard, self._seed = builder, split, shard, seed
    self._shuffle = shuffle

  def __iter__(self) -> _TfDataIterator:
    def make(skip: int) -> Any:
      ds = self._builder.as_dataset(split=self._split, shuffle_files=False)
      ds = ds.shard(self._shard[1], self._shard[0])
      if self._shuffle:
        ds = ds.shuffle(10_000, seed=self._seed, reshuffle_each_iteration=True)
      return tfds.as_numpy(ds.repeat().skip(skip))
    return _TfDataIterator(make)


def _read(builder: Any, name: str, split: str, data_dir: str | None, shard: tuple[int, int],
          seed: int, shuffle: bool, read_options: grain.ReadOptions,
          transform: Callable[[int, Any], transforms.Example]) -> grain.IterDataset:
  """One source as an endless IterDataset of transformed examples (this host's shard)."""
  fmt = builder.info.file_format
  if fmt == tfds.core.FileFormat.ARRAY_RECORD:
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    ds = grain.MapDataset.source(src)[shard[0]::shard[1]]
    if len(ds) == 0:
      raise DatasetError(f"dataset {name!r} split {split!r} has {len(src)} examples: nothing "
                         f"for shard {shard[0]} of {shard[1]}")
    if shuffle:
      ds = ds.shuffle(seed=seed)
    return ds.repeat().map_with_index(transform).to_iter_dataset(read_options)
  try:
    import tensorflow  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise DatasetError(
        f"dataset {name!r} is stored as {getattr(fmt, 'value', fmt)}, which is read through "
        "tf.data: install the `tensorflow` extra (pip install 'janus_jax[tensorflow]'), or "
        "rebuild it with file_format='array_record'") from e
  ds = _TfDataIterDataset(builder, split, shard, seed, shuffle)
  return ds.map(lambda pair: transform(*pair))


# ------------------------------------------------------------------------------ transforms

def _task_transform(task: str, keys: dict[str, str | None], pretokenized: str | None,
                    layout: transforms.Layout, name: str,
                    rng_parts: tuple[int, ...]) -> Callable[[int, Any], transforms.Example]:
  """(stream index, raw example) -> Example for one task's source."""
  where = f"dataset {name!r}"
  if task == "text":
    return lambda i, ex: transforms.text_example(transforms.as_text(ex[keys["text"]]), layout)
  if task == "understanding":
    def chat(i: int, ex: Any) -> transforms.Example:
      rng = np.random.default_rng([*rng_parts, i])  # per example: the same at every resume
      if keys.get("messages"):
        messages = transforms.as_messages(ex[keys["messages"]])
        images = list(ex[keys["images"]]) if keys.get("images") else []
      else:
        messages = transforms.caption_chat(transforms.as_text(ex[keys["caption"]]),
                                           layout.caption_prompt)
        images = [ex[keys["image"]]]
      return transforms.chat_example(messages, images, layout, where, rng)
    return chat

  def generation(i: int, ex: Any) -> transforms.Example:
    rng = np.random.default_rng([*rng_parts, i])  # per example: the same at every resume
    caption = transforms.as_text(ex[keys["caption"]])
    if pretokenized:
      return transforms.generation_example(caption, layout, rng, image_ids=ex[pretokenized])
    return transforms.generation_example(caption, layout, rng, image=ex[keys["image"]])
  return generation


def _source_keys(task: str, src: Any) -> tuple[dict[str, str | None], str | None]:
  features = _get(src, "features")
  keys = _as_dict(features) if features is not None else dict(DEFAULT_FEATURES[task])
  pretokenized = _get(src, "pretokenized_key") if task == "generation" else None
  required = {"understanding": (), "text": ("text",), "generation": ("caption",)}[task]
  if task == "understanding" and not keys.get("messages"):
    required = ("image", "caption")
  if task == "generation" and not pretokenized:
    required += ("image",)
  missing = [k for k in required if not keys.get(k)]
  if missing:
    raise DatasetError(f"the {task} source's features map lacks {missing}; it has {keys}")
  if pretokenized:
    keys.pop("image", None)
  return keys, pretokenized


def _weights(mixture: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
  if isinstance(mixture, Mapping):
    unknown = set(mixture) - set(TASKS)
    if unknown:
      raise ValueError(f"unknown tasks in mixture: {sorted(unknown)}; expected {TASKS}")
    weights = {t: float(mixture.get(t, 0)) for t in TASKS}
  else:
    if len(mixture) != 3:
      raise ValueError(f"mixture must be (understanding, text, generation), got {mixture}")
    weights = dict(zip(TASKS, map(float, mixture)))
  if any(w < 0 for w in weights.values()) or not any(weights.values()):
    raise ValueError(f"mixture weights must be >= 0 with a positive one, got {weights}")
  return weights


# ------------------------------------------------------------------------------ the pipeline

def _open_source(c: Any, task: str, weight: float) -> tuple[Any, Any, dict, str | None]:
  """(source config, builder, feature keys, pretokenized key) of a task, checked."""
  sources = _get(c, "sources", {})
  src = sources.get(task, None) if sources is not None else None
  if src is None or not _get(src, "name"):
    raise DatasetError(f"mixture weight {weight} for {task} but data.sources.{task} "
                       "names no dataset")
  n_gen, seq_len = int(_get(c, "num_image_tokens_gen", 576)), int(_get(c, "seq_len", 4096))
  if task == "generation" and 2 + n_gen > seq_len:
    raise ValueError(f"seq_len {seq_len} cannot hold {n_gen} image tokens plus a prompt")
  keys, pretokenized = _source_keys(task, src)
  name = _get(src, "name")
  builder = open_builder(name, _get(src, "split", "train"), _get(src, "data_dir") or None)
  check_features(name, list(builder.info.features.keys()),
                 {**keys, "pretokenized_key": pretokenized}, task)
  return src, builder, keys, pretokenized


def check_sources(data_config: Any, mixture: Sequence[float] | Mapping[str, float]) -> None:
  """Fails with a DatasetError naming the dataset / split / key unless every source with a
  positive weight can be read (cheap: opens dataset_info only). Call before compiling."""
  for task, weight in _weights(mixture).items():
    if weight > 0:
      _open_source(data_config, task, weight)


def make_dataset(data_config: Any, tokenizer: Tokenizer, family: str, *, seed: int,
                 mixture: Sequence[float] | Mapping[str, float], batch_size: int,
                 image_tokenizer: packing.ImageTokenizer | None = None, shard_index: int = 0,
                 shard_count: int = 1) -> grain.IterDataset:
  """The pipeline as a grain IterDataset of batches (see the module docstring)."""
  c = data_config
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
  system = _get(c, "system_prompt", processing.SYSTEM_PROMPT)
  layout = transforms.Layout(
      tokenizer=tokenizer, family=family, seq_len=int(_get(c, "seq_len", 4096)),
      max_images=int(_get(c, "max_images_per_row", 4)),
      image_size=int(_get(c, "image_size", 384)),
      gen_image_size=int(_get(c, "gen_image_size", 384)),
      num_image_tokens_und=int(_get(c, "num_image_tokens_und", 576)),
      num_image_tokens_gen=int(_get(c, "num_image_tokens_gen", 576)),
      cfg_drop=float(_get(c, "cfg_drop", 0.1)), system_prompt=system,
      caption_prompt=_get(c, "caption_prompt", "Describe this image in detail."),
      und_max_shift=int(_get(c, "und_max_shift", 0)),
      und_max_rotation=float(_get(c, "und_max_rotation", 0.0)),
      und_max_scale=float(_get(c, "und_max_scale", 0.0)),
      image_codebook_size=int(_get(c, "image_codebook_size", 0)))
  if family not in processing.ROLES:
    raise ValueError(f"unknown family {family!r}; expected one of {sorted(processing.ROLES)}")
  weights = _weights(mixture)
  read_options = grain.ReadOptions(num_threads=int(_get(c, "read_threads", 4)),
                                   prefetch_buffer_size=int(_get(c, "prefetch", 16)))
  streams, stream_weights = [], []
  for k, task in enumerate(TASKS):
    if weights[task] == 0:
      continue
    src, builder, keys, pretokenized = _open_source(c, task, weights[task])
    name, split = _get(src, "name"), _get(src, "split", "train")
    data_dir = _get(src, "data_dir") or None
    if task == "generation" and not pretokenized and image_tokenizer is None:
      raise ValueError("the generation source needs an image_tokenizer (or pretokenized_key)")
    transform = _with_context(_task_transform(task, keys, pretokenized, layout, name,
                                              (seed, k, shard_index, shard_count)),
                              task, name, split)
    ds = _read(builder, name, split, data_dir, (shard_index, shard_count),
               _seed(seed, k), bool(_get(c, "shuffle", True)), read_options, transform)
    ds = ds.filter(_KeepFitting(task, name, layout))  # dropped examples come as {}
    if task == "generation" and not pretokenized:
      ds = packing.tokenize_images(ds, image_tokenizer, int(_get(c, "vq_batch", 16)),
                                   layout.num_image_tokens_gen)
    streams.append(ds)
    stream_weights.append(weights[task])
  ds = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, stream_weights)
  ds = packing.PackIterDataset(
      ds, pack=bool(_get(c, "pack", True)), seq_len=layout.seq_len, max_images=layout.max_images,
      image_size=layout.image_size, pad_id=tokenizer.pad_id,
      placeholder_id=tokenizer.image_placeholder_id)
  ds = ds.batch(batch_size, drop_remainder=True)
  ahead = int(_get(c, "batch_prefetch", 2))
  if ahead > 0:  # its get_state is the state after the batches handed out, not those made ahead
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=ahead)
  return grain.experimental.WithOptionsIterDataset(
      ds, grain.experimental.DatasetOptions(filter_raise_threshold_ratio=_MAX_DROP_RATIO))


def make_pipeline(data_config: Any, tokenizer: Tokenizer, family: str, *, seed: int,
                  mixture: Sequence[float] | Mapping[str, float], batch_size: int,
                  image_tokenizer: packing.ImageTokenizer | None = None, shard_index: int = 0,
                  shard_count: int = 1) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of per-host batches (see the module docstring)."""
  return iter(make_dataset(data_config, tokenizer, family, seed=seed, mixture=mixture,
                           batch_size=batch_size, image_tokenizer=image_tokenizer,
                           shard_index=shard_index, shard_count=shard_count))
