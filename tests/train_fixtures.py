"""Synthetic batches in the data pipeline's contract (janus_jax/data), for train-step tests."""

from __future__ import annotations

import numpy as np


def synthetic_batch(config, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """Rows that mix the three tasks: an understanding example (image placeholders + answer), a
  text example, and a text-to-image example (prompt, then image tokens), packed per row."""
  rng = np.random.default_rng(seed)
  m = config.model
  t, n_und = config.data.seq_len, (m.vision.image_size // m.vision.patch_size) ** 2
  n_gen, vocab, codes = m.vq.grid_size**2, m.llm.vocab_size, m.vq.codebook_size
  size = m.vision.image_size
  b = {k: np.zeros((batch_size, t), dt) for k, dt in [
      ("input_ids", np.int32), ("image_token_mask", bool), ("image_mask", bool), ("targets", np.int32),
      ("target_is_image", bool), ("loss_mask", bool), ("segment_ids", np.int32),
      ("positions", np.int32), ("task", np.int32)]}
  b["pixels"] = np.zeros((batch_size, 1, size, size, 3), np.float32)
  b["image_valid"] = np.zeros((batch_size, 1), bool)
  for r in range(batch_size):
    col, seg = 0, 1
    layout = [("und", 4 + n_und + 3), ("gen", 5 + n_gen), ("text", 8)]
    for kind, length in layout:
      if col + length > t:
        break
      sl = slice(col, col + length)
      ids = rng.integers(10, vocab, length)
      b["input_ids"][r, sl] = ids
      b["segment_ids"][r, sl] = seg
      b["positions"][r, sl] = np.arange(length)
      b["targets"][r, col:col + length - 1] = ids[1:]
      if kind == "und":
        b["image_mask"][r, col + 2:col + 2 + n_und] = True
        b["input_ids"][r, col + 2:col + 2 + n_und] = 5
        b["pixels"][r, 0] = rng.uniform(-1, 1, (size, size, 3))
        b["image_valid"][r, 0] = True
        b["loss_mask"][r, col + length - 4:col + length - 1] = True
        b["task"][r, sl] = 0
      elif kind == "gen":
        start = col + 5
        image = rng.integers(0, codes, n_gen)
        b["input_ids"][r, start:start + n_gen] = image
        b["image_token_mask"][r, start:start + n_gen] = True
        b["targets"][r, start - 1:start + n_gen - 1] = image
        b["target_is_image"][r, start - 1:start + n_gen - 1] = True
        b["loss_mask"][r, start - 1:start + n_gen - 1] = True
        b["task"][r, sl] = 2
      else:
        b["loss_mask"][r, col:col + length - 1] = True
        b["task"][r, sl] = 1
      col, seg = col + length, seg + 1
  return b
