"""Tiny local datasets, a tiny tokenizer and a fake image tokenizer for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from janus_jax import processing
from janus_jax.data import builders, pipeline
from janus_jax.tokenizer import IMAGE_TAG, Tokenizer, train_sentencepiece

FAMILY = "janus_pro"
N_UND, N_GEN, SIZE = 4, 4, 16
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
CAPTIONS = [f"a {COLOURS[i % 8]} square number {i}" for i in range(24)]
TEXT_LINES = [f"line {i} of file {f}: the lazy dog sleeps." for f in range(2) for i in range(10)]
CHATS = [
    ({"messages": [{"role": "user", "content": "What colour is this?"},
                   {"role": "assistant", "content": "It is red."}], "images": ["img/0.png"]}),
    ({"messages": [{"role": "user", "content": "Compare <image_placeholder> and "
                                               "<image_placeholder>."},
                   {"role": "assistant", "content": "The first is green."},
                   {"role": "user", "content": "And the second?"},
                   {"role": "assistant", "content": "Blue."}],
      "images": ["img/1.png", "img/2.png"]}),
    ({"messages": [{"role": "user", "content": "Say hello."},
                   {"role": "assistant", "content": "Hello there!"}], "images": []}),
] + [({"messages": [{"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": f"Answer {i}."}],
       "images": [f"img/{i % 8}.png"]}) for i in range(3, 12)]


def colour(i: int) -> np.ndarray:
  """A distinct uint8 RGB colour per image index."""
  return np.array([(37 * i) % 256, (91 * i + 40) % 256, (53 * i + 200) % 256], np.uint8)


def write_image(path: Path, i: int) -> None:
  """A 16x20 (w 20) image: two halves of different shades, so crops and pads differ."""
  path.parent.mkdir(parents=True, exist_ok=True)
  arr = np.tile(colour(i), (SIZE, 20, 1))
  arr[:, 10:] //= 2
  Image.fromarray(arr).save(path)


def make_folders(root: Path) -> dict[str, Path]:
  """Source folders for the three builders."""
  caps = root / "captions"
  for i in range(len(CAPTIONS)):
    write_image(caps / f"img/{i}.png", i)
  (caps / "captions.jsonl").write_text("".join(
      json.dumps({"image": f"img/{i}.png", "caption": c}) + "\n" for i, c in enumerate(CAPTIONS)))
  chats = root / "chats"
  for i in range(8):
    write_image(chats / f"img/{i}.png", i)
  (chats / "conversations.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
  texts = root / "texts"
  texts.mkdir(parents=True)
  for f in range(2):
    lines = [t for t in TEXT_LINES if t.endswith(f"file {f}: the lazy dog sleeps.")]
    (texts / f"f{f}.txt").write_text("\n\n".join(lines) + "\n")
  return {"captions": caps, "chats": chats, "texts": texts}


def build_all(root: Path) -> tuple[Path, dict[str, str]]:
  """Builds the three datasets into root/data; returns (data_dir, tfds names)."""
  folders = make_folders(root / "src")
  data_dir = root / "data"
  names = {"captions": builders.build(builders.ImageCaptions, folders["captions"], data_dir, "t"),
           "chats": builders.build(builders.ChatConversations, folders["chats"], data_dir, "t"),
           "texts": builders.build(builders.TextFiles, folders["texts"], data_dir, "t")}
  return data_dir, names


def make_tokenizer(root: Path) -> Tokenizer:
  lines = CAPTIONS + TEXT_LINES + [processing.SYSTEM_PROMPT, IMAGE_TAG] + [
      m["content"] for c in CHATS for m in c["messages"]]
  return Tokenizer.from_file(train_sentencepiece(lines * 4, 400, root / "tok" / "tiny.model"))


def fake_image_tokenizer(pixels: np.ndarray) -> np.ndarray:
  """float32 [n, H, W, 3] -> int32 [n, 4]: each quadrant's mean colour, 4 levels per channel."""
  n, h, w, _ = pixels.shape
  quads = pixels.reshape(n, 2, h // 2, 2, w // 2, 3).mean(axis=(2, 4)).reshape(n, 4, 3)
  levels = np.clip(((quads + 1) / 2 * 4).astype(np.int32), 0, 3)
  return (levels[..., 0] * 16 + levels[..., 1] * 4 + levels[..., 2]).astype(np.int32)


def data_config(data_dir: Path, names: dict[str, str], **overrides) -> object:
  """A small data config over the three test datasets."""
  c = pipeline.default_config()
  c.update(dict(seq_len=320, max_images_per_row=2, image_size=SIZE, gen_image_size=SIZE,
                num_image_tokens_und=N_UND, num_image_tokens_gen=N_GEN, vq_batch=4,
                read_threads=0, cfg_drop=0.0))
  c.sources.understanding = pipeline.source_config(names["chats"], data_dir=str(data_dir))
  c.sources.text = pipeline.source_config(names["texts"], data_dir=str(data_dir))
  c.sources.generation = pipeline.source_config(names["captions"], data_dir=str(data_dir))
  c.update(overrides)
  return c
