"""Text tokenizer: a HF byte-level BPE `tokenizer.json` (the released checkpoints) or a
sentencepiece `.model` (our own small models), behind one interface.

Every special id (BOS, EOS, pad, image tags) is looked up in the tokenizer files, never
hard-coded: the pad id differs between releases (Pro-1B 100002, Pro-7B 100015), and getting it
wrong breaks classifier-free guidance silently.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
import tokenizers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TAG = "<｜▁pad▁｜>"  # the processor's `pad_tag`; its vocab id is the pad id
IMAGE_TAG = "<image_placeholder>"
IMAGE_START_TAG = "<begin_of_image>"
IMAGE_END_TAG = "<end_of_image>"
USER_TAG = "<|User|>"
ASSISTANT_TAG = "<|Assistant|>"
# Symbols our sentencepiece models always keep whole (sentencepiece has its own bos/eos/pad).
SP_SPECIALS = (IMAGE_TAG, IMAGE_START_TAG, IMAGE_END_TAG, USER_TAG, ASSISTANT_TAG)
# Strings dropped by `decode(skip_special_tokens=True)` on the sentencepiece path; HF
# tokenizer.json files carry their own `special` flags instead.
_SP_SKIPPED = frozenset(SP_SPECIALS)
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# sentencepiece ModelProto.SentencePiece.Type.USER_DEFINED
_SP_USER_DEFINED = 4


def _token_string(value) -> str | None:
  """A config entry is a string, an AddedToken dict ({"content": ...}) or null."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _sp_piece_record(piece: str) -> bytes:
  """A serialized `ModelProto.pieces` entry (field 1) for a user-defined piece.

  Concatenating serialized protobuf messages merges them and appends repeated fields, so adding
  this to a model's bytes appends one piece without needing the protobuf package.
  """
  text = piece.encode("utf-8")
  body = (b"\x0a" + _varint(len(text)) + text          # piece: string, field 1
          + b"\x15" + struct.pack("<f", 0.0)           # score: float, field 2
          + b"\x18" + _varint(_SP_USER_DEFINED))       # type: enum, field 3
  return b"\x0a" + _varint(len(body)) + body


class Tokenizer:
  """One of `tokenizers.Tokenizer` (HF tokenizer.json) or `SentencePieceProcessor`.

  Build it with `Tokenizer.from_dir` / `Tokenizer.from_file`. `<image_placeholder>` is added as a
  special token when the file lacks it, as the reference processor does, so its id is read after
  that step.
  """

  def __init__(self, backend: tokenizers.Tokenizer | spm.SentencePieceProcessor, source: str,
               token_config: dict[str, str | None] | None = None,
               config_files: dict[str, bytes] | None = None, model_name: str = "tokenizer.model"):
    self._backend = backend
    self.source = source  # named in error messages
    self._is_sp = isinstance(backend, spm.SentencePieceProcessor)
    self._config = dict(token_config or {})
    self._config_files = dict(config_files or {})
    self._model_name = model_name
    if self.token_to_id(IMAGE_TAG) is None:
      self._add_special(IMAGE_TAG)
    self._sp_control_re = None
    if self._is_sp:
      sp = self._backend
      controls = [sp.id_to_piece(i) for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()) if i >= 0]
      if controls:
        self._sp_control_re = re.compile(
            "(" + "|".join(map(re.escape, sorted(controls, key=len, reverse=True))) + ")")

  # ---------------------------------------------------------------- loading / saving

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads `tokenizer.json` (preferred) or the single `*.model` in `path`, plus
    `tokenizer_config.json` / `special_tokens_map.json` when present."""
    root = Path(path)
    json_file = root / "tokenizer.json"
    models = sorted(root.glob("*.model")) if root.is_dir() else []
    if json_file.is_file():
      file = json_file
    elif len(models) == 1:
      file = models[0]
    elif len(models) > 1:
      raise FileNotFoundError(f"{root} has no tokenizer.json and several sentencepiece models "
                              f"({', '.join(m.name for m in models)}); pass one to from_file")
    else:
      raise FileNotFoundError(f"no tokenizer in {root}: expected tokenizer.json or one "
                              "sentencepiece *.model file")
    return cls.from_file(file)

  @classmethod
  def from_file(cls, file: str | os.PathLike) -> Tokenizer:
    """Loads a `tokenizer.json` or a sentencepiece `.model`; config files are read from the
    same directory."""
    file = Path(file)
    config_files = {name: (file.parent / name).read_bytes() for name in _CONFIG_FILES
                    if (file.parent / name).is_file()}
    # tokenizer_config.json wins over special_tokens_map.json, as in transformers.
    token_config: dict[str, str | None] = {}
    for name in reversed(_CONFIG_FILES):
      if name in config_files:
        try:
          data = json.loads(config_files[name])
        except ValueError as e:
          raise ValueError(f"{file.parent / name}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
          raise ValueError(f"{file.parent / name}: expected a JSON object, found "
                           f"{type(data).__name__}")
        for key in ("bos_token", "eos_token", "pad_token"):
          value = _token_string(data.get(key))
          if value is not None:
            token_config[key] = value
    if file.suffix == ".json":
      try:
        backend = tokenizers.Tokenizer.from_file(str(file))
      except Exception as e:  # tokenizers raises a bare Exception that names no file
        raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None
      # Padding or truncation saved in the file would apply to every encode (transformers
      # ignores them unless a call asks): prompts would lose <begin_of_image> or gain pads.
      backend.no_padding()
      backend.no_truncation()
    else:
      backend = spm.SentencePieceProcessor(model_file=str(file))
    return cls(backend, str(file), token_config, config_files, model_name=file.name)

  def save(self, dst_dir: str | os.PathLike) -> Path:
    """Writes the tokenizer (with any auto-added token) and the config files it was loaded with
    into `dst_dir`; returns the tokenizer file's path."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    if self._is_sp:
      out = dst / self._model_name
      out.write_bytes(self._backend.serialized_model_proto())
    else:
      out = dst / "tokenizer.json"
      self._backend.save(str(out))
    for name, data in self._config_files.items():
      (dst / name).write_bytes(data)
    return out

  def _add_special(self, token: str) -> None:
    if self._is_sp:
      proto = self._backend.serialized_model_proto() + _sp_piece_record(token)
      self._backend = spm.SentencePieceProcessor(model_proto=proto)
    else:
      self._backend.add_special_tokens(
          [tokenizers.AddedToken(token, special=True, normalized=False)])

  # ---------------------------------------------------------------- vocabulary

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (the LLM embedding may be larger)."""
    if self._is_sp:
      return self._backend.vocab_size()
    return self._backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    if self._is_sp:
      i = self._backend.piece_to_id(token)
      # piece_to_id answers unk for unknown pieces; only an exact piece counts.
      return i if self._backend.id_to_piece(i) == token else None
    return self._backend.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    if self._is_sp:
      return self._backend.id_to_piece(i) if 0 <= i < self.vocab_size else None
    return self._backend.id_to_token(i)

  def _require(self, token: str, what: str) -> int:
    i = self.token_to_id(token)
    if i is None:
      raise KeyError(f"{what} token {token!r} is not in the tokenizer {self.source}")
    return i

  def _sp_special(self, i: int, what: str) -> int:
    if i < 0:
      raise KeyError(f"the sentencepiece model {self.source} has no {what} id")
    return i

  @property
  def bos_id(self) -> int:
    if self._is_sp:
      return self._sp_special(self._backend.bos_id(), "bos")
    return self._require(self._config.get("bos_token") or BOS_TOKEN, "bos")

  @property
  def eos_id(self) -> int:
    if self._is_sp:
      return self._sp_special(self._backend.eos_id(), "eos")
    return self._require(self._config.get("eos_token") or EOS_TOKEN, "eos")

  @property
  def pad_id(self) -> int:
    """The vocab id of `<｜▁pad▁｜>` (the reference's pad_tag), else the configured pad token;
    sentencepiece models use their own pad id."""
    if self._is_sp:
      return self._sp_special(self._backend.pad_id(), "pad")
    i = self.token_to_id(PAD_TAG)
    if i is not None:
      return i
    configured = self._config.get("pad_token")
    if configured is None:
      raise KeyError(f"pad token {PAD_TAG!r} is not in the tokenizer {self.source} and no "
                     "pad_token is configured")
    return self._require(configured, "pad")

  @property
  def image_placeholder_id(self) -> int:
    return self._require(IMAGE_TAG, "image placeholder")

  @property
  def begin_of_image_id(self) -> int:
    return self._require(IMAGE_START_TAG, "begin-of-image")

  @property
  def end_of_image_id(self) -> int:
    return self._require(IMAGE_END_TAG, "end-of-image")

  # ---------------------------------------------------------------- encode / decode

  def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
    # Text is encoded without the post-processor, so BOS is added here exactly once; a text
    # that already starts with the BOS string keeps its single BOS.
    if add_bos and not (ids and ids[0] == self.bos_id):
      return [self.bos_id] + ids
    return ids

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """text -> ids, BOS first when `add_bos`; EOS is never appended (as the reference)."""
    if self._is_sp:
      ids = self._sp_encode(text)
    else:
      ids = self._backend.encode(text, add_special_tokens=False).ids
    return self._with_bos(list(ids), add_bos)

  def _sp_encode(self, text: str) -> list[int]:
    # sentencepiece never matches control pieces (bos/eos/pad) in text, but tokenizer.json does
    # and the chat template writes the EOS string: map those strings to their ids here.
    if self._sp_control_re is None or self._sp_control_re.search(text) is None:
      return self._backend.encode(text)
    ids: list[int] = []
    for k, part in enumerate(self._sp_control_re.split(text)):
      if k % 2:
        ids.append(self._backend.piece_to_id(part))
      elif part:
        ids += self._backend.encode(part)
    return ids

  def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
    if self._is_sp:
      rows = [self._sp_encode(t) for t in texts]
    else:
      rows = [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
    return [self._with_bos(list(r), add_bos) for r in rows]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    # Ids past the tokenizer (the LLM's table is larger: 102400 rows for ~100015 tokens) decode
    # to nothing, on both backends (tokenizers skips them; sentencepiece would raise).
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    if not self._is_sp:
      return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
    sp = self._backend
    if skip_special_tokens:
      return sp.decode([i for i in ids if not sp.is_control(i)
                        and sp.id_to_piece(i) not in _SP_SKIPPED])
    # sentencepiece renders control pieces (bos/eos/pad) as "": write their piece text instead.
    parts, run = [], []
    for i in ids:
      if sp.is_control(i):
        parts += [sp.decode(run), sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(parts + [sp.decode(run)])

  def __repr__(self) -> str:
    kind = "sentencepiece" if self._is_sp else "tokenizer.json"
    return f"Tokenizer({kind}, {self.source}, vocab_size={self.vocab_size})"


def train_sentencepiece(lines: Iterable[str], vocab_size: int,
                        dst_path: str | os.PathLike) -> Path:
  """Trains a small BPE sentencepiece model on `lines` and writes it to `dst_path` (a `.model`).

  Ids 0..3 are pad/unk/bos/eos (named `<｜▁pad▁｜>`, `<unk>`, `<｜begin▁of▁sentence｜>`,
  `<｜end▁of▁sentence｜>`), then the Janus symbols (`SP_SPECIALS`), always one piece each even
  inside running text. Byte fallback covers any character; identity normalisation without a
  dummy prefix or whitespace folding makes decode(encode(text)) == text.
  """
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(lines)), model_writer=buf, model_type="bpe",
      vocab_size=vocab_size, character_coverage=1.0,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3,  # pad is disabled (-1) unless set
      # DeepSeek's strings for the control pieces, so prompts (the template writes the EOS string
      # after assistant turns) and decoded text read the same as with tokenizer.json.
      pad_piece=PAD_TAG, unk_piece="<unk>", bos_piece=BOS_TOKEN, eos_piece=EOS_TOKEN,
      user_defined_symbols=list(SP_SPECIALS), byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      num_threads=1, minloglevel=2)
  dst = Path(dst_path)
  dst.parent.mkdir(parents=True, exist_ok=True)
  dst.write_bytes(buf.getvalue())
  return dst
