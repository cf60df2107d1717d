"""Raw dataset examples -> token streams, one function per task.

An `Example` is a dict of numpy arrays for one sequence of length L:
  ids int32 [L]          text ids, or VQ ids where is_image
  is_image bool [L]      generated-image token inputs
  loss bool [L]          the target at t (the token at t + 1) counts; always False at L - 1
  task int32 []          0 understanding, 1 text-only, 2 text-to-image
  pixels float32 [n, S, S, 3]  understanding images in placeholder order (n may be 0)
Generation examples leave the transform with the prompt only plus `gen_pixels` [G, G, 3];
`with_image_ids` appends the N VQ ids once the image tokenizer has run.

Length policy (L > seq_len): text is truncated to seq_len; understanding is truncated when every
image span ends inside seq_len and some answer token survives, else dropped; generation is
dropped. Understanding examples with more images than max_images_per_row are dropped. A dropped
example is returned as `{}` and filtered out downstream.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from janus_jax import processing
from janus_jax.tokenizer import IMAGE_TAG, Tokenizer

UNDERSTANDING, TEXT, GENERATION = 0, 1, 2
Example = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Everything the transforms need besides the example."""

  tokenizer: Tokenizer
  family: str
  seq_len: int
  max_images: int
  image_size: int
  gen_image_size: int
  num_image_tokens_und: int
  num_image_tokens_gen: int
  cfg_drop: float
  system_prompt: str
  caption_prompt: str
  und_max_shift: int = 0
  und_max_rotation: float = 0.0
  und_max_scale: float = 0.0
  image_codebook_size: int = 0  # 0: stored image ids unchecked


# ------------------------------------------------------------------------------ decoding

def as_text(value: Any) -> str:
  """tfds Text comes back as bytes (or a 0-d numpy array of them)."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, str):
    return value
  raise TypeError(f"expected text, got {type(value).__name__}")


def as_image(value: Any) -> Image.Image | np.ndarray:
  """A decoded uint8 array (tfds Image) as it is, or encoded bytes decoded with PIL."""
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
    return value
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(bytes(value))) as img:
      return img.convert("RGB")
  raise TypeError(f"expected an image (uint8 array or encoded bytes), got {type(value).__name__}")


def as_messages(value: Any) -> list[dict[str, str]]:
  """tfds Sequence({role, content}) (a dict of lists), a list of dicts, or JSON text."""
  if isinstance(value, (bytes, str, np.bytes_)) or (isinstance(value, np.ndarray)
                                                     and value.ndim == 0):
    value = json.loads(as_text(value))
  if isinstance(value, dict):
    roles, contents = list(value["role"]), list(value["content"])
    value = [{"role": r, "content": c} for r, c in zip(roles, contents)]
  return [{"role": as_text(m["role"]).lower(), "content": as_text(m["content"])} for m in value]


def crop_image(image: Any, size: int) -> np.ndarray:
  """Generation recipe: short side -> size (bicubic), centre crop -> float32 [size, size, 3]."""
  img = processing.to_rgb(image)
  w, h = img.size
  scale = size / min(w, h)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  img = img.resize((new_w, new_h), Image.BICUBIC)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  img = img.crop((left, top, left + size, top + size))
  # A square image of exactly `size` passes preprocess_image unresized: only the normalisation.
  return processing.preprocess_image(img, size)


# ------------------------------------------------------------------------------ examples

def _example(ids: Sequence[int], loss: Sequence[bool], task: int, pixels: np.ndarray,
             is_image: Sequence[bool] | None = None) -> Example:
  ids = np.asarray(ids, np.int32)
  loss = np.asarray(loss, bool).copy()
  loss[-1] = False  # the last token of a segment has no target
  return {"ids": ids, "is_image": (np.zeros(len(ids), bool) if is_image is None
                                   else np.asarray(is_image, bool)),
          "loss": loss, "task": np.int32(task), "pixels": pixels}


def _no_pixels(layout: Layout) -> np.ndarray:
  return np.zeros((0, layout.image_size, layout.image_size, 3), np.float32)


def _spells_image_tags(ids: Sequence[int], tok: Tokenizer) -> bool:
  """Whether ids hold an image tag: text that spells `<image_placeholder>`, `<begin_of_image>` or
  `<end_of_image>` encodes to its control id, which in plain text or a caption would open an
  image slot with no image (and shift every later image of the batch). Such examples are
  dropped (`{}`), as the length policy drops what cannot fit."""
  return not {tok.image_placeholder_id, tok.begin_of_image_id,
              tok.end_of_image_id}.isdisjoint(ids)


def text_example(text: str, layout: Layout) -> Example:
  """BOS + text + EOS, loss on every predicted token; truncated to seq_len; `{}` when the text
  spells an image tag."""
  tok = layout.tokenizer
  ids = (tok.encode(text) + [tok.eos_id])[:layout.seq_len]
  if _spells_image_tags(ids, tok):
    return {}
  return _example(ids, [True] * len(ids), TEXT, _no_pixels(layout))


def chat_pieces(messages: list[dict[str, str]], family: str,
                system: str) -> list[tuple[str, bool]]:
  """The chat-template text cut into (text, is_answer) pieces, joining to `chat_prompt`.

  Each answer piece is ` {answer}<EOS>`, starting right after `{Assistant}:`, the point where a
  prompt ends at inference, so the prompt pieces tokenize exactly as inference prompts do.
  """
  for i, message in enumerate(messages):
    if message["role"] != ("user", "assistant")[i % 2]:
      raise ValueError(f"message {i} has role {message['role']!r}: turns must alternate "
                       "user/assistant from the user")
    if not message["content"].strip():
      raise ValueError(f"message {i} is empty")
  full = processing.chat_prompt(messages, family, system)
  pieces, pos = [], 0
  for k in range(1, len(messages), 2):
    prompt = processing.chat_prompt(messages[:k], family, system)  # ends with "{Assistant}:"
    end = len(processing.chat_prompt(messages[:k + 1], family, system))
    assert full.startswith(prompt), (full, prompt)
    pieces += [(full[pos:len(prompt)], False), (full[len(prompt):end], True)]
    pos = end
  if pos < len(full):
    pieces.append((full[pos:], False))
  return pieces


def chat_example(messages: list[dict[str, str]], images: Sequence[Any], layout: Layout,
                 where: str = "", rng: np.random.Generator | None = None) -> Example:
  """Chat template (system prompt, placeholders expanded to BOI + N x placeholder + EOI), loss
  on each assistant answer and its EOS; `{}` when it cannot fit (see the module docstring).
  With layout.und_max_shift > 0, each image moves by a random offset drawn from `rng`; with
  und_max_rotation / und_max_scale too, it goes through a random affine map (`random_affine`)."""
  tok = layout.tokenizer
  if len(images) > layout.max_images:
    return {}
  tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
  if images and not tags:  # no explicit tags: images go first in the first user turn
    first = dict(messages[0], content=f"{IMAGE_TAG}\n" * len(images) + messages[0]["content"])
    messages = [first] + list(messages[1:])
  elif tags != len(images):
    raise ValueError(f"{where}: {tags} {IMAGE_TAG} tags but {len(images)} images")
  if not messages or messages[-1]["role"] != "assistant":
    raise ValueError(f"{where}: a training conversation must end with an assistant answer")
  try:
    pieces = chat_pieces(messages, layout.family, layout.system_prompt)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e
  ids: list[int] = []
  answer: list[bool] = []
  for text, is_answer in pieces:
    piece = tok.encode(text, add_bos=not ids)
    if is_answer and tok.image_placeholder_id in piece:
      raise ValueError(f"{where}: an assistant answer contains {IMAGE_TAG}")
    piece = processing.expand_image_placeholders(piece, tok, layout.num_image_tokens_und)
    ids += piece
    answer += [is_answer] * len(piece)
  # The target at t is ids[t + 1]: the loss counts where that next token is an answer token.
  loss = answer[1:] + [False]
  if len(ids) > layout.seq_len:
    placeholder = np.flatnonzero(np.asarray(ids) == tok.image_placeholder_id)
    if placeholder.size and placeholder[-1] + 1 >= layout.seq_len:  # the EOI would be cut
      return {}
    ids, loss = ids[:layout.seq_len], loss[:layout.seq_len]
    loss[-1] = False
    if not any(loss):
      return {}
  s = layout.image_size
  pixels = np.stack([processing.preprocess_image(as_image(im), s) for im in images]) if images \
      else _no_pixels(layout)
  affine = layout.und_max_rotation or layout.und_max_scale
  if images and (layout.und_max_shift or affine):
    if rng is None:
      raise ValueError("und_max_shift / und_max_rotation / und_max_scale need an rng")
    if affine:
      pixels = np.stack([random_affine(p, layout.und_max_shift, layout.und_max_rotation,
                                       layout.und_max_scale, rng) for p in pixels])
    else:
      pixels = np.stack([random_shift(p, layout.und_max_shift, rng) for p in pixels])
  return _example(ids, loss, UNDERSTANDING, pixels.astype(np.float32))


def random_shift(pixels_SxSxC: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """The image moved by (dy, dx), each uniform in [-max_shift, max_shift], its edges repeated
  into the uncovered border (pad-and-crop augmentation)."""
  s = pixels_SxSxC.shape[0]
  padded = np.pad(pixels_SxSxC, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)), "edge")
  dy, dx = rng.integers(0, 2 * max_shift + 1, size=2)
  return padded[dy:dy + s, dx:dx + s]


def random_affine(pixels_SxSxC: np.ndarray, max_shift: float, max_rotation: float,
                  max_scale: float, rng: np.random.Generator) -> np.ndarray:
  """The image rotated by a uniform angle in +-max_rotation degrees and scaled by 1 +- max_scale
  about its centre, then moved by up to +-max_shift pixels per axis (sub-pixel); bilinear, edges
  repeated (as random_shift)."""
  s = pixels_SxSxC.shape[0]
  angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
  scale = 1.0 + rng.uniform(-max_scale, max_scale)
  shift_2 = rng.uniform(-max_shift, max_shift, size=2)
  centre_2 = np.full(2, (s - 1) / 2)
  # affine_transform maps each output (row, col) o to the input point inv @ o + offset.
  inv_2x2 = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]]) / scale
  offset_2 = centre_2 - inv_2x2 @ (centre_2 + shift_2)
  channels = [ndimage.affine_transform(pixels_SxSxC[..., c], inv_2x2, offset_2, order=1,
                                       mode="nearest") for c in range(pixels_SxSxC.shape[-1])]
  return np.stack(channels, axis=-1).astype(pixels_SxSxC.dtype)


def caption_chat(caption: str, prompt: str) -> list[dict[str, str]]:
  """An image-caption pair as a one-turn understanding conversation."""
  return [{"role": "user", "content": f"{IMAGE_TAG}\n{prompt}"},
          {"role": "assistant", "content": caption}]


def generation_prompt_ids(caption: str, layout: Layout, rng: np.random.Generator) -> list[int]:
  """generation_prompt(caption) ids; with probability cfg_drop every token but BOS and the final
  `<begin_of_image>` becomes pad (the reference's unconditional row)."""
  tok = layout.tokenizer
  ids = tok.encode(processing.generation_prompt(caption, layout.family))
  if ids[0] != tok.bos_id or ids[-1] != tok.begin_of_image_id:
    raise ValueError(f"generation prompt ids must run BOS ... <begin_of_image>, got {ids}")
  if rng.random() < layout.cfg_drop:
    ids = [ids[0]] + [tok.pad_id] * (len(ids) - 2) + [ids[-1]]
  return ids


def generation_example(caption: str, layout: Layout, rng: np.random.Generator,
                       image: Any = None, image_ids: np.ndarray | None = None) -> Example:
  """Prompt ids (+ `gen_pixels` [G, G, 3] when `image` is given, for the image tokenizer; or the
  stored `image_ids` [N] appended at once); `{}` when prompt + N exceeds seq_len or the caption
  spells an image tag."""
  ids = generation_prompt_ids(caption, layout, rng)
  if (len(ids) + layout.num_image_tokens_gen > layout.seq_len
      or _spells_image_tags(ids[:-1], layout.tokenizer)):  # [-1]: the prompt's own tag
    return {}
  ex = _example(ids, [False] * len(ids), GENERATION, _no_pixels(layout))
  if image_ids is not None:
    return with_image_ids(ex, image_ids, layout.num_image_tokens_gen, layout.image_codebook_size)
  ex["gen_pixels"] = crop_image(as_image(image), layout.gen_image_size)
  return ex


def with_image_ids(ex: Example, image_ids: Any, num_tokens: int, codebook_size: int = 0) -> Example:
  """Appends the N VQ ids to a generation prompt; loss from `<begin_of_image>` (predicting the
  first image token) to the second-to-last image token. codebook_size > 0: ids must be below it
  (stored ids of another VQ would index past the generation embedding, which JAX clamps)."""
  image_ids = np.asarray(image_ids).reshape(-1)
  if image_ids.shape != (num_tokens,) or not np.issubdtype(image_ids.dtype, np.integer):
    raise ValueError(f"expected {num_tokens} integer image-token ids, got {image_ids.dtype} "
                     f"{image_ids.shape}")
  if image_ids.min() < 0:
    raise ValueError("image-token ids must be >= 0")
  if codebook_size and image_ids.max() >= codebook_size:
    raise ValueError(f"image-token id {int(image_ids.max())} is outside the VQ codebook of "
                     f"{codebook_size} (data.image_codebook_size): ids stored by another VQ?")
  n_prompt = len(ex["ids"])
  ids = np.concatenate([ex["ids"], image_ids.astype(np.int32)])
  is_image = np.arange(len(ids)) >= n_prompt
  loss = np.arange(len(ids)) >= n_prompt - 1
  return _example(ids, loss, GENERATION, ex["pixels"], is_image)
