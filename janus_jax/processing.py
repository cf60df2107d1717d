"""Inputs and outputs around the model: image preprocessing, the DeepSeek chat template,
image-placeholder expansion, batching, and pixels -> uint8.

Everything follows the reference (`VLMImageProcessor`, `VLChatProcessor`, conversation style
`SeparatorStyle.DeepSeek`) to the bit; see the architecture notes, section 5. Batches are numpy
arrays, left-padded, images NHWC in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from janus_jax.tokenizer import EOS_TOKEN, IMAGE_START_TAG, IMAGE_TAG, Tokenizer

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language.")
# Role strings per family: Janus-1.3B writes plain words, Janus-Pro its special tokens.
ROLES = {"janus": ("User", "Assistant"), "janus_pro": ("<|User|>", "<|Assistant|>")}
SEPS = ("\n\n", EOS_TOKEN)  # after a user turn, after an assistant turn

# (uint8 * 1/255 in float64 -> float32, then (x - 0.5) / 0.5 in float32), tabulated: the exact
# arithmetic of the reference `rescale` + `normalize`, for every possible byte.
_PIXEL_LUT = ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
              - np.float32(0.5)) / np.float32(0.5)


# ------------------------------------------------------------------------------ images

def to_rgb(image: Any) -> Image.Image:
  """A PIL image of any mode, or uint8 numpy [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], as an RGB
  PIL image (alpha is dropped, not composited, as the reference loader's `.convert("RGB")`)."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise TypeError(f"numpy images must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
      raise ValueError(f"numpy image must be [H, W], [H, W, 3] or [H, W, 4], got {image.shape}")
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
  return image.convert("RGB")


def preprocess_image(image: Any, image_size: int = 384,
                     background: tuple[int, int, int] = (127, 127, 127),
                     min_size: int = 14) -> np.ndarray:
  """One image -> float32 [image_size, image_size, 3] in [-1, 1].

  Longest side -> image_size (sides truncated with int(), at least min_size), PIL bicubic, then
  centred on a square of the background colour (floor offset), then x/255, then (x - 0.5)/0.5.
  """
  img = to_rgb(image)
  w, h = img.size
  if w <= 0 or h <= 0:  # as the reference's resize ("Invalid size!")
    raise ValueError(f"image of size {w}x{h}: both sides must be positive")
  m = max(w, h)
  new_w = max(int(w / m * image_size), min_size)
  new_h = max(int(h / m * image_size), min_size)
  img = img.resize((new_w, new_h), Image.BICUBIC)
  if new_w != new_h:
    side = max(new_w, new_h)
    square = Image.new("RGB", (side, side), tuple(background))
    square.paste(img, ((side - new_w) // 2, (side - new_h) // 2))
    img = square
  return _PIXEL_LUT[np.asarray(img)]


def postprocess(pixels: Any) -> np.ndarray:
  """Pixels in [-1, 1] (any float dtype, [..., H, W, 3]) -> uint8 of the same shape.

  As the reference: float32, clip((x + 1) / 2 * 255, 0, 255), then truncation (not rounding).
  """
  x = np.asarray(pixels).astype(np.float32)
  return np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ prompts

def _roles(family: str) -> tuple[str, str]:
  if family not in ROLES:
    raise ValueError(f"unknown family {family!r}; expected one of {sorted(ROLES)}")
  return ROLES[family]


def format_conversation(messages: Sequence[dict[str, str]], system: str = "") -> str:
  """The "deepseek" template. messages: dicts with `role` (written as given) and `content`.

  Turn i is `role: content` + ("\\n\\n" if i is even else EOS); an empty content is `role:`.
  Contents are stripped, and so is the whole prompt.
  """
  out = system + SEPS[0] if system else ""
  for i, message in enumerate(messages):
    content = message["content"].strip()
    # The separator follows the turn index, not the role: turns must alternate from the user.
    out += f"{message['role']}: {content}{SEPS[i % 2]}" if content else f"{message['role']}:"
  return out.strip()


def chat_prompt(turns: Sequence[dict[str, str]], family: str,
                system: str = SYSTEM_PROMPT) -> str:
  """A conversation with generic roles ("user" / "assistant", any case) in the family's roles;
  an empty assistant turn is appended when the last turn is the user's."""
  user, assistant = _roles(family)
  names = {"user": user, "assistant": assistant}
  messages = []
  for turn in turns:
    role = turn["role"]
    if role.lower() not in names:
      raise ValueError(f"role must be 'user' or 'assistant', got {role!r}")
    messages.append({"role": names[role.lower()], "content": turn["content"]})
  if not messages or messages[-1]["role"] == user:
    messages.append({"role": assistant, "content": ""})
  return format_conversation(messages, system)


def understanding_prompt(question: str, family: str, num_images: int = 1,
                         system: str = SYSTEM_PROMPT) -> str:
  """`{system}\\n\\n{User}: <image_placeholder>\\n{question}\\n\\n{Assistant}:`, one
  placeholder line per image."""
  content = f"{IMAGE_TAG}\n" * num_images + question
  return chat_prompt([{"role": "user", "content": content}], family, system)


def generation_prompt(prompt: str, family: str) -> str:
  """`{User}: {prompt}\\n\\n{Assistant}:<begin_of_image>` (no system prompt)."""
  return chat_prompt([{"role": "user", "content": prompt}], family, system="") + IMAGE_START_TAG


# ------------------------------------------------------------------------------ ids

def expand_image_placeholders(ids: Sequence[int], tokenizer: Tokenizer,
                              num_image_tokens: int) -> list[int]:
  """Each `<image_placeholder>` id -> [BOI] + [placeholder] * num_image_tokens + [EOI]."""
  image, boi, eoi = (tokenizer.image_placeholder_id, tokenizer.begin_of_image_id,
                     tokenizer.end_of_image_id)
  out: list[int] = []
  for i in ids:
    out += [boi] + [image] * num_image_tokens + [eoi] if i == image else [i]
  return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, pad_to_multiple: int | None = None,
             max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Rows of ids -> (ids [B, T] int32, valid [B, T] bool), left-padded with pad_id.

  T is the longest row, rounded up to `pad_to_multiple` (to bound the number of compiled
  shapes) but never above `max_length`; a row longer than `max_length` is an error.
  """
  if not rows:
    raise ValueError("no prompts: the batch is empty")
  longest = max(len(r) for r in rows)
  if max_length is not None and longest > max_length:
    which = max(range(len(rows)), key=lambda b: len(rows[b]))
    raise ValueError(f"prompt {which} is {longest} tokens long, more than max_length={max_length}")
  t = longest
  if pad_to_multiple:
    t = -(-t // pad_to_multiple) * pad_to_multiple
  if max_length is not None:
    t = min(t, max_length)
  ids = np.full((len(rows), t), pad_id, np.int32)
  valid = np.zeros((len(rows), t), bool)
  for b, row in enumerate(rows):
    if row:
      ids[b, t - len(row):] = row
      valid[b, t - len(row):] = True
  return ids, valid


class Processor:
  """Prompts and images -> model batches for one tokenizer and model family."""

  def __init__(self, tokenizer: Tokenizer, family: str, image_size: int = 384,
               num_image_tokens: int = 576, background: tuple[int, int, int] = (127, 127, 127),
               min_size: int = 14, system_prompt: str = SYSTEM_PROMPT):
    _roles(family)
    self.system_prompt = system_prompt  # what understanding prompts start with by default
    self.tokenizer = tokenizer
    self.family = family
    self.image_size = image_size
    self.num_image_tokens = num_image_tokens
    self.background = background
    self.min_size = min_size

  def preprocess(self, image: Any) -> np.ndarray:
    """One image -> float32 [S, S, 3] in [-1, 1]."""
    return preprocess_image(image, self.image_size, self.background, self.min_size)

  def chat_batch(self, conversations: Sequence[Sequence[dict[str, str]]],
                 images: Sequence[Sequence[Any]] | None = None, system: str | None = None,
                 pad_to_multiple: int | None = None,
                 max_length: int | None = None) -> dict[str, np.ndarray]:
    """Multi-turn conversations (generic roles; `<image_placeholder>` written in the text where
    each image goes) with their images, in order -> a batch.

    Returns input_ids [B, T] int32, attention_mask [B, T] bool, image_mask [B, T] bool (True at
    the num_image_tokens positions per image), pixels [B, N, S, S, 3] float32 (zeros where a
    sample has fewer than N = max(1, most images) images), image_valid [B, N] bool.
    """
    images = images if images is not None else [[] for _ in conversations]
    if len(images) != len(conversations):
      raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    system = self.system_prompt if system is None else system
    prompts = [chat_prompt(c, self.family, system) for c in conversations]
    rows = []
    placeholder = self.tokenizer.image_placeholder_id
    for b, (prompt, imgs) in enumerate(zip(prompts, images)):
      ids = self.tokenizer.encode(prompt)
      if ids.count(placeholder) != len(imgs):
        raise ValueError(f"sample {b} has {ids.count(placeholder)} {IMAGE_TAG} tags but "
                         f"{len(imgs)} images")
      rows.append(expand_image_placeholders(ids, self.tokenizer, self.num_image_tokens))
    input_ids, attention_mask = left_pad(rows, self.tokenizer.pad_id, pad_to_multiple, max_length)
    n = max([1] + [len(imgs) for imgs in images])  # the reference keeps at least one slot
    s = self.image_size
    pixels = np.zeros((len(rows), n, s, s, 3), np.float32)
    image_valid = np.zeros((len(rows), n), bool)
    for b, imgs in enumerate(images):
      for j, image in enumerate(imgs):
        pixels[b, j] = self.preprocess(image)
        image_valid[b, j] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "image_mask": (input_ids == placeholder) & attention_mask,
            "pixels": pixels, "image_valid": image_valid}

  def understanding_batch(self, questions: Sequence[str], images: Sequence[Sequence[Any]],
                          system: str | None = None, pad_to_multiple: int | None = None,
                          max_length: int | None = None) -> dict[str, np.ndarray]:
    """One question per sample about its images (placeholders first, one line each); the batch
    layout is `chat_batch`'s."""
    if len(questions) != len(images):
      raise ValueError(f"{len(questions)} questions but {len(images)} image lists")
    conversations = [[{"role": "user", "content": f"{IMAGE_TAG}\n" * len(imgs) + q}]
                     for q, imgs in zip(questions, images)]
    return self.chat_batch(conversations, images, system, pad_to_multiple, max_length)

  def generation_batch(self, prompts: Sequence[str], pad_to_multiple: int | None = None,
                       max_length: int | None = None) -> dict[str, np.ndarray]:
    """Text-to-image prompts -> input_ids [B, T] int32 (left-padded; BOS first and
    <begin_of_image> last in each row) and attention_mask [B, T] bool."""
    rows = self.tokenizer.encode_batch([generation_prompt(p, self.family) for p in prompts])
    input_ids, attention_mask = left_pad(rows, self.tokenizer.pad_id, pad_to_multiple, max_length)
    return {"input_ids": input_ids, "attention_mask": attention_mask}

  def decode(self, ids: Sequence[int]) -> str:
    """Generated ids -> text, special tokens skipped (as the reference demos)."""
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  @staticmethod
  def postprocess(pixels: Any) -> np.ndarray:
    return postprocess(pixels)
