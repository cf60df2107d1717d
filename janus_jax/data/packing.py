"""Examples -> fixed-shape rows (packed or padded), and the batched image-tokenizer stage.

Both stages are grain `IterDataset`s whose iterators checkpoint through `get_state`/`set_state`
with plain JSON-able dicts, so a saved pipeline resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from janus_jax.data.transforms import Example, with_image_ids

ImageTokenizer = Callable[[np.ndarray], Any]  # float32 [n, H, W, 3] in [-1, 1] -> int [n, N]


def assemble_row(examples: Sequence[Example], seq_len: int, max_images: int, image_size: int,
                 pad_id: int, placeholder_id: int) -> dict[str, np.ndarray]:
  """Lays examples end to end in one row of seq_len tokens (the contract's per-row arrays).

  Returns input_ids, targets, task, segment_ids, positions int32 [T]; image_token_mask,
  image_mask, target_is_image, loss_mask bool [T]; pixels float32 [I, S, S, 3]; image_valid
  bool [I]. Padding: segment 0, input pad_id, target 0, every mask False, task 0.
  """
  t, s = seq_len, image_size
  row = {"input_ids": np.full(t, pad_id, np.int32), "targets": np.zeros(t, np.int32),
         "image_token_mask": np.zeros(t, bool), "image_mask": np.zeros(t, bool),
         "target_is_image": np.zeros(t, bool), "loss_mask": np.zeros(t, bool),
         "segment_ids": np.zeros(t, np.int32), "positions": np.zeros(t, np.int32),
         "task": np.zeros(t, np.int32), "pixels": np.zeros((max_images, s, s, 3), np.float32),
         "image_valid": np.zeros(max_images, bool)}
  off = img = 0
  for seg, ex in enumerate(examples, 1):
    ids, is_image, n = ex["ids"], ex["is_image"], len(ex["ids"])
    n_img = len(ex["pixels"])
    if off + n > t or img + n_img > max_images:
      raise ValueError(f"examples overflow a row: {off + n} tokens > {t} or "
                       f"{img + n_img} images > {max_images}")
    sl = slice(off, off + n)
    row["input_ids"][sl] = ids
    row["image_token_mask"][sl] = is_image
    # VQ ids share the id space with text: only text positions can be placeholders.
    row["image_mask"][sl] = (ids == placeholder_id) & ~is_image
    row["targets"][off:off + n - 1] = ids[1:]
    row["target_is_image"][off:off + n - 1] = is_image[1:]
    row["loss_mask"][sl] = ex["loss"]
    row["loss_mask"][off + n - 1] = False
    row["segment_ids"][sl] = seg
    row["positions"][sl] = np.arange(n)
    row["task"][sl] = ex["task"]
    row["pixels"][img:img + n_img] = ex["pixels"]
    row["image_valid"][img:img + n_img] = True
    off, img = off + n, img + n_img
  return row


class _PackIterator(grain.DatasetIterator):
  """Greedy sequential packing: examples join the current row while tokens and images fit; the
  first one that does not fit starts the next row, so no example is ever split."""

  def __init__(self, parent: grain.DatasetIterator, pack: bool, assemble: Callable[..., Any],
               seq_len: int, max_images: int):
    super().__init__(parent)
    self._pack, self._assemble = pack, assemble
    self._seq_len, self._max_images = seq_len, max_images
    # The example read ahead that did not fit, and the parent state from before reading it:
    # the checkpoint stores that state, so the example is simply read again after a restore.
    self._pending: Example | None = None
    self._pending_state: dict[str, Any] | None = None

  def _next_example(self) -> tuple[Example, dict[str, Any]]:
    if self._pending is not None:
      ex, state = self._pending, self._pending_state
      self._pending = self._pending_state = None
      return ex, state
    state = self._parent.get_state()
    return next(self._parent), state

  def __next__(self) -> dict[str, np.ndarray]:
    row: list[Example] = []
    used = images = 0
    while True:
      try:
        ex, state = self._next_example()
      except StopIteration:
        if row:
          break
        raise
      n, n_img = len(ex["ids"]), len(ex["pixels"])
      if row and (not self._pack or used + n > self._seq_len
                  or images + n_img > self._max_images):
        self._pending, self._pending_state = ex, state
        break
      row.append(ex)
      used, images = used + n, images + n_img
      if not self._pack:
        break
    return self._assemble(row)

  def get_state(self) -> dict[str, Any]:
    return {"parent": (self._pending_state if self._pending is not None
                       else self._parent.get_state())}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = self._pending_state = None


class PackIterDataset(grain.IterDataset):
  """Examples -> rows of `assemble_row` (pack=True: several examples per row; False: one)."""

  def __init__(self, parent: grain.IterDataset, *, pack: bool, seq_len: int, max_images: int,
               image_size: int, pad_id: int, placeholder_id: int):
    super().__init__(parent)
    self._pack, self._seq_len, self._max_images = pack, seq_len, max_images
    self._row_args = (seq_len, max_images, image_size, pad_id, placeholder_id)

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._pack,
                         lambda row: assemble_row(row, *self._row_args),
                         self._seq_len, self._max_images)

  def __str__(self) -> str:
    return f"PackIterDataset(pack={self._pack}, seq_len={self._seq_len})"


class _Unbatch(grain.experimental.FlatMapTransform):
  """Lists of examples -> examples."""

  def __init__(self, max_fan_out: int):
    self.max_fan_out = max_fan_out

  def flat_map(self, element: list[Example]) -> list[Example]:
    return element


def tokenize_images(ds: grain.IterDataset, image_tokenizer: ImageTokenizer, group: int,
                    num_tokens: int) -> grain.IterDataset:
  """Runs `image_tokenizer` on `group` generation images at a time (a fixed batch shape, so a
  jitted VQ encode compiles once) and appends each row of ids to its example."""

  def run(examples: list[Example]) -> list[Example]:
    pixels = np.stack([ex["gen_pixels"] for ex in examples])
    ids = np.asarray(image_tokenizer(pixels))
    if ids.shape != (len(examples), num_tokens):
      raise ValueError(f"image_tokenizer returned shape {ids.shape} for {len(examples)} images; "
                       f"expected ({len(examples)}, {num_tokens}) (data.num_image_tokens_gen)")
    return [with_image_ids(ex, row, num_tokens) for ex, row in zip(examples, ids)]

  ds = ds.batch(group, batch_fn=list).map(run)
  return grain.experimental.FlatMapIterDataset(ds, _Unbatch(group))
