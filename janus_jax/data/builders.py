"""tfds builders for local folders, written as array_record with no TensorFlow.

Three builders, each reading a source folder (or file) named by its `FolderConfig`:

* `ImageCaptions`: a folder of images + `captions.jsonl` lines `{"image": "rel/path.png",
  "caption": "..."}` -> features `image` (uint8 [H, W, 3] when read), `caption` (text).
* `ChatConversations`: a jsonl file (or a folder holding `conversations.jsonl`) of
  `{"messages": [{"role": "user"|"assistant", "content": ...}], "images": ["rel/path", ...]}`
  -> features `messages` (sequence of {role, content}), `images` (sequence of images).
  `<image_placeholder>` in the contents marks where each image goes; with none, the pipeline puts
  them at the start of the first user turn.
* `TextFiles`: every `*.txt` under a folder -> feature `text`, one example per non-empty line
  (`split_by="line"`) or per blank-line-separated paragraph (`split_by="paragraph"`).

`pretokenize_captions` turns a built image-caption dataset into {caption, image_ids}: every image
through the (frozen) generation tokenizer once, so training reads ids (the pipeline's
`pretokenized_key`) instead of running the VQ encoder on every batch.

Images are stored as their encoded bytes (PNG/JPEG files unchanged; anything else or non-RGB
re-encoded as RGB PNG with PIL), never as numpy through tfds' encoder, which needs TensorFlow.
Everything goes into one "train" split. Build, then read by name:

  name = build(ImageCaptions, "path/to/folder", data_dir="/data", config_name="cc")
  src = tfds.data_source(name, split="train", data_dir="/data")  # name == "image_captions/cc"
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from janus_jax.tokenizer import IMAGE_TAG

_ROLES = ("user", "assistant")


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """`source`: the folder (or jsonl file) read; `split_by`: "line" | "paragraph" (TextFiles)."""

  source: str = ""
  split_by: str = "line"


def image_bytes(path: str | os.PathLike) -> bytes:
  """Encoded bytes of an image file: RGB PNG/JPEG files as they are, anything else -> RGB PNG."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"image file {path} does not exist")
  data = path.read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # decodes: a cut file opens (open reads the header) and fails only here
  except (OSError, SyntaxError, ValueError) as e:  # (PIL raises all three for bad files)
    raise ValueError(f"image file {path} cannot be decoded: {type(e).__name__}: {e}") from e
  with Image.open(io.BytesIO(data)) as img:
    if img.format in ("PNG", "JPEG") and img.mode == "RGB":
      return data
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
  return buf.getvalue()


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, object) for every non-empty line; a bad line fails naming file and line."""
  with path.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
      if not isinstance(obj, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
      yield n, obj


def check_conversation(messages: Any, num_images: int, where: str) -> None:
  """Turns must alternate user/assistant from the user, end with the assistant, and be
  non-empty; `<image_placeholder>` tags must be absent or match the image count."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: 'messages' must be a non-empty list")
  tags = 0
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise ValueError(f"{where}: message {i} needs a string 'content'")
    role = str(m.get("role", "")).lower()
    if role != _ROLES[i % 2]:
      raise ValueError(f"{where}: message {i} has role {m.get('role')!r}, expected "
                       f"{_ROLES[i % 2]!r} (turns alternate from the user)")
    if not m["content"].strip():
      raise ValueError(f"{where}: message {i} is empty")
    if role == "assistant" and IMAGE_TAG in m["content"]:  # the reader would refuse it mid-run
      raise ValueError(f"{where}: message {i} (assistant) contains {IMAGE_TAG}: images go in "
                       "user turns")
    tags += m["content"].count(IMAGE_TAG)
  if role != "assistant":
    raise ValueError(f"{where}: the last message must be the assistant's")
  if tags and tags != num_images:
    raise ValueError(f"{where}: {tags} {IMAGE_TAG} tags but {num_images} images")


class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared constructor: `Builder(source, data_dir=..., config_name=...)` builds array_record."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [FolderConfig(name="default")]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> Path:
    # tfds' default probes `importlib_resources` (not installed) for package modules; the path
    # only serves a download-checksums lookup, and these builders download nothing.
    return Path(inspect.getfile(cls))

  def __init__(self, source: str | os.PathLike | None = None, *, config_name: str = "default",
               split_by: str = "line", file_format: str = "array_record", **kwargs: Any):
    if source is not None:
      kwargs["config"] = FolderConfig(name=config_name, source=os.fspath(source),
                                      split_by=split_by)
    super().__init__(file_format=file_format, **kwargs)

  @property
  def source(self) -> Path:
    src = getattr(self.builder_config, "source", "")
    if not src:
      raise ValueError(f"{self.name}: no source folder given (pass `source=`)")
    path = Path(src)
    if not path.exists():
      raise FileNotFoundError(f"{self.name}: source {path} does not exist")
    return path

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # local files only
    return {"train": self._generate_examples()}


class ImageCaptions(_FolderBuilder):
  """Images + captions.jsonl -> {image, caption}."""

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self, ...): dataset_info_from_configs looks for package metadata files.
    return tfds.core.DatasetInfo(
        builder=self, description="Local images with captions (captions.jsonl).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text()}))

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    root = self.source
    index = root / "captions.jsonl"
    if not index.is_file():
      raise FileNotFoundError(f"{self.name}: {index} does not exist")
    for n, obj in _read_jsonl(index):
      if not isinstance(obj.get("image"), str) or not isinstance(obj.get("caption"), str):
        raise ValueError(f"{index}:{n}: needs string 'image' and 'caption' fields")
      yield f"{n}", {"image": image_bytes(root / obj["image"]), "caption": obj["caption"]}


class ChatConversations(_FolderBuilder):
  """conversations.jsonl (+ images) -> {messages: [{role, content}], images: [image]}."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Local multi-turn conversations with images (jsonl).",
        features=tfds.features.FeaturesDict({
            "messages": tfds.features.Sequence({"role": tfds.features.Text(),
                                                "content": tfds.features.Text()}),
            "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3)))}))

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    path = self.source
    if path.is_dir():
      path = path / "conversations.jsonl"
    if not path.is_file():
      raise FileNotFoundError(f"{self.name}: {path} does not exist")
    for n, obj in _read_jsonl(path):
      images = obj.get("images") or []
      if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"{path}:{n}: 'images' must be a list of paths")
      check_conversation(obj.get("messages"), len(images), f"{path}:{n}")
      messages = [{"role": m["role"].lower(), "content": m["content"]} for m in obj["messages"]]
      yield f"{n}", {"messages": messages,
                     "images": [image_bytes(path.parent / p) for p in images]}


class TextFiles(_FolderBuilder):
  """*.txt files -> {text}, one example per non-empty line or paragraph."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Local plain-text files.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    root = self.source
    split_by = self.builder_config.split_by
    if split_by not in ("line", "paragraph"):
      raise ValueError(f"{self.name}: split_by must be 'line' or 'paragraph', got {split_by!r}")
    files = [root] if root.is_file() else sorted(root.rglob("*.txt"))
    if not files:
      raise FileNotFoundError(f"{self.name}: no .txt files under {root}")
    for file in files:
      text = file.read_text(encoding="utf-8")
      if split_by == "line":
        units = text.splitlines()
      else:  # paragraphs: blank-line separated, inner newlines kept
        units, current = [], []
        for line in text.splitlines() + [""]:
          if line.strip():
            current.append(line)
          elif current:
            units.append("\n".join(current))
            current = []
      rel = file.name if root.is_file() else file.relative_to(root).as_posix()
      for k, unit in enumerate(units):
        if unit.strip():
          yield f"{rel}:{k}", {"text": unit}


def build(builder_cls: type[_FolderBuilder], source: str | os.PathLike, data_dir: str | os.PathLike,
          config_name: str = "default", **kwargs: Any) -> str:
  """Builds `source` into `data_dir` (array_record) and returns the tfds name to read it by,
  `"{builder name}/{config_name}"`. kwargs go to the builder (e.g. split_by="paragraph")."""
  builder = builder_cls(source, config_name=config_name, data_dir=os.fspath(data_dir), **kwargs)
  builder.download_and_prepare()
  return f"{builder.name}/{config_name}"


# ------------------------------------------------------------------------------ pretokenizing

class PretokenizedCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """{caption, image_ids int32 [N]}: a caption dataset with its images as generation-tokenizer
  ids. Built by `pretokenize_captions`; read by name like the others."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> Path:
    return Path(inspect.getfile(cls))

  def __init__(self, examples: Callable[[str], Iterator[dict[str, Any]]] | None = None, *,
               splits: Sequence[str] = ("train",), num_tokens: int = 0,
               config_name: str = "default", **kwargs: Any):
    self._examples, self._splits, self._num_tokens = examples, tuple(splits), num_tokens
    kwargs["config"] = tfds.core.BuilderConfig(name=config_name)
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        # disable_shuffling: kept in the source's order (tfds shuffles on write otherwise).
        builder=self, description="Captions with their images' generation-tokenizer ids.",
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "caption": tfds.features.Text(),
            "image_ids": tfds.features.Tensor(shape=(self._num_tokens,), dtype=np.int32)}))

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, ex in enumerate(self._examples(split)):
      yield f"{i}", ex


def pretokenize_captions(name: str, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                         image_tokenizer: Callable[[np.ndarray], np.ndarray], *,
                         gen_image_size: int, num_tokens: int, splits: Sequence[str] = ("train",),
                         image_key: str = "image", caption_key: str = "caption",
                         batch_size: int = 64, config_name: str = "default") -> str:
  """Builds `pretokenized_captions/{config_name}` into out_dir from the caption dataset `name`
  in data_dir and returns its name; a dataset already built there is kept.

  Images go through the pipeline's generation crop (`gen_image_size`), then `image_tokenizer`
  (pixels [batch_size, G, G, 3] in [-1, 1] -> ids [batch_size, num_tokens]; the last batch is
  padded to that fixed shape). The examples keep their order; read them with
  `source_config(name, data_dir=out_dir, features={"caption": "caption"},
  pretokenized_key="image_ids")`. tfds writes into an `.incomplete` folder and renames it when
  done, so an interrupted build is redone, never read half-written."""
  from janus_jax.data import transforms  # pylint: disable=import-outside-toplevel

  def examples(split: str) -> Iterator[dict[str, Any]]:
    src = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)
    for start in range(0, len(src), batch_size):
      rows = [src[i] for i in range(start, min(start + batch_size, len(src)))]
      for key in (image_key, caption_key):
        if key not in rows[0]:
          raise KeyError(f"dataset {name!r} in {data_dir} has no feature {key!r}; it has "
                         f"{sorted(rows[0])}")
      pixels = np.stack([transforms.crop_image(transforms.as_image(r[image_key]), gen_image_size)
                         for r in rows])
      padded = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - len(rows), 0)])
      ids = np.asarray(image_tokenizer(padded))
      if ids.shape != (batch_size, num_tokens):
        raise ValueError(f"image_tokenizer returned shape {ids.shape} for {batch_size} images; "
                         f"expected ({batch_size}, {num_tokens}) (num_tokens)")
      for r, row_ids in zip(rows, ids):
        yield {"caption": transforms.as_text(r[caption_key]), "image_ids": row_ids.astype(np.int32)}

  builder = PretokenizedCaptions(examples, splits=splits, num_tokens=num_tokens,
                                 config_name=config_name, data_dir=os.fspath(out_dir))
  if not builder.is_prepared():
    builder.download_and_prepare()
  return f"{builder.name}/{config_name}"
