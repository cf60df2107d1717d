"""The data pipeline: tfds builders on tiny folders, exact token layouts and masks per task,
CFG caption dropping, packing, mixing, determinism, exact resume, sharding, clear errors."""

import dataclasses
import importlib.util
import io
import json
import logging
import re
import shutil

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_fixtures import (CAPTIONS, CHATS, FAMILY, N_GEN, N_UND, SIZE, TEXT_LINES, build_all,
                           data_config, fake_image_tokenizer, make_tokenizer)
from PIL import Image

from janus_jax import processing
from janus_jax.data import DatasetError, builders, transforms
from janus_jax.data import make_pipeline as _make_pipeline
from janus_jax.tokenizer import EOS_TOKEN, IMAGE_END_TAG, IMAGE_START_TAG, IMAGE_TAG

BOS = "<｜begin▁of▁sentence｜>"
KEYS = {"input_ids", "image_token_mask", "image_mask", "pixels", "image_valid", "targets",
        "target_is_image", "loss_mask", "segment_ids", "positions", "task"}


_OPEN_ITERATORS = []


def make_pipeline(*args, **kwargs):
  """janus_jax.data.make_pipeline, closed after the test (its prefetch thread holds a cycle that
  grain's __del__ cannot close from inside that thread)."""
  it = _make_pipeline(*args, **kwargs)
  _OPEN_ITERATORS.append(it)
  return it


@pytest.fixture(autouse=True)
def _close_iterators():
  yield
  while _OPEN_ITERATORS:
    _OPEN_ITERATORS.pop().close()


@dataclasses.dataclass
class Env:
  data_dir: object
  names: dict
  tok: object

  def config(self, **overrides):
    return data_config(self.data_dir, self.names, **overrides)

  def pipeline(self, mixture, batch_size=1, seed=0, **overrides):
    return make_pipeline(self.config(**overrides), self.tok, FAMILY, seed=seed, mixture=mixture,
                         batch_size=batch_size, image_tokenizer=fake_image_tokenizer)

  def source(self, key):
    return tfds.data_source(self.names[key], split="train", data_dir=str(self.data_dir))

  def decode(self, ids):
    return self.tok.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  data_dir, names = build_all(root)
  return Env(data_dir, names, make_tokenizer(root))


def rows(it, n):
  """The first n rows of an iterator of batches, as dicts of per-row arrays."""
  out = []
  while len(out) < n:
    batch = next(it)
    assert set(batch) == KEYS
    out += [{k: v[b] for k, v in batch.items()} for b in range(len(batch["input_ids"]))]
  return out[:n]


def segment(row, s):
  return {k: v[row["segment_ids"] == s] for k, v in row.items() if k not in ("pixels",
                                                                              "image_valid")}


def expand(text):
  return text.replace(IMAGE_TAG, IMAGE_START_TAG + IMAGE_TAG * N_UND + IMAGE_END_TAG)


# ------------------------------------------------------------------------------ builders

def test_builders_read_back(env, tmp_path):
  caps = env.source("captions")
  assert len(caps) == len(CAPTIONS)
  for ex in (caps[i] for i in range(len(caps))):
    i = CAPTIONS.index(ex["caption"].decode())
    written = np.asarray(Image.open(env.data_dir.parent / f"src/captions/img/{i}.png"))
    np.testing.assert_array_equal(ex["image"], written)
  chats = env.source("chats")
  assert len(chats) == len(CHATS)
  ex = next(chats[i] for i in range(len(chats)) if len(chats[i]["images"]) == 2)
  assert [r.decode() for r in ex["messages"]["role"]] == ["user", "assistant"] * 2
  assert [c.decode() for c in ex["messages"]["content"]] == [m["content"]
                                                             for m in CHATS[1]["messages"]]
  texts = env.source("texts")
  assert sorted(texts[i]["text"].decode() for i in range(len(texts))) == sorted(TEXT_LINES)

  # paragraphs, non-RGB images, and a malformed conversation
  (tmp_path / "t").mkdir()
  (tmp_path / "t/a.txt").write_text("one\ntwo\n\n\nthree\n")
  name = builders.build(builders.TextFiles, tmp_path / "t", tmp_path / "d", "p",
                        split_by="paragraph")
  src = tfds.data_source(name, split="train", data_dir=str(tmp_path / "d"))
  assert sorted(src[i]["text"].decode() for i in range(len(src))) == ["one\ntwo", "three"]
  Image.fromarray(np.full((5, 7), 9, np.uint8)).save(tmp_path / "gray.png")
  assert Image.open(__import__("io").BytesIO(builders.image_bytes(tmp_path / "gray.png"))).mode \
      == "RGB"
  with pytest.raises(ValueError, match="message 1 has role 'user'"):
    builders.check_conversation([{"role": "user", "content": "a"},
                                 {"role": "user", "content": "b"}], 0, "x.jsonl:3")
  with pytest.raises(ValueError, match=r"x.jsonl:4: message 1 \(assistant\) contains"):
    builders.check_conversation([{"role": "user", "content": "a"},
                                 {"role": "assistant", "content": f"{IMAGE_TAG} b"}], 1, "x.jsonl:4")


# ------------------------------------------------------------------------------ layouts

def check_row_basics(row, length):
  """One example per row: segment 1 then padding; positions count from 0."""
  assert (row["segment_ids"][:length] == 1).all() and (row["segment_ids"][length:] == 0).all()
  np.testing.assert_array_equal(row["positions"][:length], np.arange(length))
  assert not row["loss_mask"][length - 1:].any()
  np.testing.assert_array_equal(row["targets"][:length - 1], row["input_ids"][1:length])


def test_understanding_layout(env):
  src = env.source("chats")
  out = rows(env.pipeline((1, 0, 0), shuffle=False, pack=False), len(src))
  for i, row in enumerate(out):
    ex = src[i]
    messages = transforms.as_messages(ex["messages"])
    n_img = len(ex["images"])
    if n_img and not any(IMAGE_TAG in m["content"] for m in messages):
      messages[0]["content"] = f"{IMAGE_TAG}\n" * n_img + messages[0]["content"]
    length = int((row["segment_ids"] > 0).sum())
    check_row_basics(row, length)
    text = expand(processing.chat_prompt(messages, FAMILY))
    assert env.decode(row["input_ids"][:length]) == BOS + text
    answers = "".join(f" {m['content']}{EOS_TOKEN}" for m in messages if m["role"] == "assistant")
    assert env.decode(row["targets"][row["loss_mask"]]) == answers
    assert row["image_mask"].sum() == N_UND * n_img
    assert (row["image_valid"] == (np.arange(2) < n_img)).all()
    for j in range(n_img):
      np.testing.assert_array_equal(row["pixels"][j],
                                    processing.preprocess_image(ex["images"][j], SIZE))
    assert not row["pixels"][n_img:].any()
    assert not row["image_token_mask"].any() and not row["target_is_image"].any()
    assert (row["task"][:length] == 0).all()
  decoded = [env.decode(r["input_ids"]) for r in out]
  assert any("And the second?" in d for d in decoded)  # the multi-turn one was checked


def test_understanding_random_shift(env):
  """und_max_shift moves each understanding image by its own offset in [-2, 2]^2, edges repeated;
  the tokens are untouched."""
  def first(**kw):
    return rows(env.pipeline((1, 0, 0), shuffle=False, pack=False, **kw), 8)
  plain, shifted = first(), first(und_max_shift=2)
  offsets = set()
  for a, b in zip(plain, shifted):
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    for j in np.flatnonzero(a["image_valid"]):
      padded = np.pad(a["pixels"][j], ((2, 2), (2, 2), (0, 0)), "edge")
      match = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(padded[dy:dy + SIZE, dx:dx + SIZE], b["pixels"][j])]
      assert match, "not a shifted copy of the image"
      offsets.add(match[0])
  assert len(offsets) > 2  # random offsets, not one fixed move


class _FixedDraws:
  """An rng whose uniform draws are given: (angle, scale offset, shift pair)."""

  def __init__(self, angle: float, scale: float, shift: tuple[float, float]):
    self.draws = [angle, scale, np.asarray(shift, float)]

  def uniform(self, low, high, size=None):
    return self.draws.pop(0)


def test_random_affine_geometry():
  """A quarter turn is np.rot90 (bilinear at whole-pixel points is exact); a whole-pixel move is
  a shift with edges repeated; a small random map keeps shape, dtype and the value range."""
  image = np.random.default_rng(0).uniform(-1, 1, (9, 9, 3)).astype(np.float32)
  turned = transforms.random_affine(image, 0, 90, 0, _FixedDraws(90.0, 0.0, (0, 0)))
  np.testing.assert_allclose(turned, np.rot90(image), atol=1e-5)
  moved = transforms.random_affine(image, 2, 0, 0, _FixedDraws(0.0, 0.0, (1, -2)))
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), "edge")
  np.testing.assert_allclose(moved, padded[1:10, 4:13], atol=1e-5)  # rows from -1, cols from +2
  bigger = transforms.random_affine(image, 0, 0, 0.5, _FixedDraws(0.0, 0.5, (0, 0)))
  np.testing.assert_allclose(bigger[4, 4], image[4, 4], atol=1e-5)  # the centre stays put
  warped = transforms.random_affine(image, 2, 12, 0.1, np.random.default_rng(1))
  assert warped.shape == image.shape and warped.dtype == np.float32
  assert image.min() - 1e-6 <= warped.min() and warped.max() <= image.max() + 1e-6
  assert not np.allclose(warped, image)


def test_understanding_random_rotation_and_scale(env):
  """und_max_rotation / und_max_scale warp each understanding image by its own random map; the
  tokens are untouched."""
  def first(**kw):
    return rows(env.pipeline((1, 0, 0), shuffle=False, pack=False, **kw), 8)
  plain, warped = first(), first(und_max_shift=1, und_max_rotation=12.0, und_max_scale=0.1)
  changed = 0
  for a, b in zip(plain, warped):
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
    for j in np.flatnonzero(a["image_valid"]):
      assert b["pixels"][j].shape == a["pixels"][j].shape
      changed += not np.allclose(a["pixels"][j], b["pixels"][j])
  assert changed >= 6


def test_understanding_from_caption_pairs(env):
  c = env.config(shuffle=False, pack=False, caption_prompt="What is shown?", system_prompt="")
  c.sources.understanding = dict(name=env.names["captions"], data_dir=str(env.data_dir),
                                 features={"image": "image", "caption": "caption"})
  it = make_pipeline(c, env.tok, FAMILY, seed=0, mixture=(1, 0, 0), batch_size=2)
  src = env.source("captions")
  for i, row in enumerate(rows(it, 2)):
    caption = src[i]["caption"].decode()
    length = int((row["segment_ids"] > 0).sum())
    assert env.decode(row["input_ids"][:length]) == BOS + expand(
        f"<|User|>: {IMAGE_TAG}\nWhat is shown?\n\n<|Assistant|>: {caption}{EOS_TOKEN}")
    assert env.decode(row["targets"][row["loss_mask"]]) == f" {caption}{EOS_TOKEN}"
    np.testing.assert_array_equal(row["pixels"][0],
                                  processing.preprocess_image(src[i]["image"], SIZE))
    assert row["image_valid"].tolist() == [True, False]


def test_text_layout(env):
  src = env.source("texts")
  for i, row in enumerate(rows(env.pipeline((0, 1, 0), shuffle=False, pack=False), 5)):
    text = src[i]["text"].decode()
    length = int((row["segment_ids"] > 0).sum())
    check_row_basics(row, length)
    assert env.decode(row["input_ids"][:length]) == BOS + text + EOS_TOKEN
    assert row["loss_mask"][:length - 1].all()
    assert env.decode(row["targets"][row["loss_mask"]]) == text + EOS_TOKEN
    assert (row["task"][:length] == 1).all() and not row["image_mask"].any()


def test_generation_layout(env):
  src = env.source("captions")
  for i, row in enumerate(rows(env.pipeline((0, 0, 1), shuffle=False, pack=False), 6)):
    ex = src[i]
    caption = ex["caption"].decode()
    prompt = env.tok.encode(processing.generation_prompt(caption, FAMILY))
    p = len(prompt)
    length = p + N_GEN
    check_row_basics(row, length)
    crop = processing.preprocess_image(ex["image"][:, 2:18], SIZE)  # 16x20: centre 16 columns
    np.testing.assert_array_equal(transforms.crop_image(ex["image"], SIZE), crop)
    vq = fake_image_tokenizer(crop[None])[0]
    np.testing.assert_array_equal(row["input_ids"][:length], np.concatenate([prompt, vq]))
    assert env.decode(row["input_ids"][:p]) == (
        f"{BOS}<|User|>: {caption}\n\n<|Assistant|>:{IMAGE_START_TAG}")
    assert (row["image_token_mask"] == ((np.arange(320) >= p) & (np.arange(320) < length))).all()
    expected_loss = (np.arange(320) >= p - 1) & (np.arange(320) < length - 1)
    assert (row["loss_mask"] == expected_loss).all()
    assert (row["target_is_image"] == expected_loss).all()
    np.testing.assert_array_equal(row["targets"][row["loss_mask"]], vq)
    assert not row["image_mask"].any() and (row["task"][:length] == 2).all()


def test_cfg_drop(env):
  pad, bos, boi = env.tok.pad_id, env.tok.bos_id, env.tok.begin_of_image_id
  dropped = 0
  out = rows(env.pipeline((0, 0, 1), batch_size=50, pack=False, cfg_drop=0.3), 300)
  for row in out:
    p = int(np.argmax(row["image_token_mask"]))
    ids = row["input_ids"][:p]
    assert ids[0] == bos and ids[-1] == boi and row["image_token_mask"][p:p + N_GEN].all()
    if (ids[1:-1] == pad).all():
      dropped += 1
    else:
      assert not (ids == pad).any()
  assert 0.2 < dropped / len(out) < 0.4
  none = rows(env.pipeline((0, 0, 1), batch_size=50, pack=False, cfg_drop=0.0), 100)
  prompts = [r["input_ids"][(r["segment_ids"] > 0) & ~r["image_token_mask"]] for r in none]
  assert not any((ids == pad).any() for ids in prompts)


def test_truncation_policy(env):
  layout = transforms.Layout(env.tok, FAMILY, 40, 1, SIZE, SIZE, N_UND, N_GEN, 0.0, "", "Q?")
  text = transforms.text_example(" ".join(TEXT_LINES), layout)
  assert len(text["ids"]) == 40 and text["loss"][:-1].all() and not text["loss"][-1]
  img = np.zeros((SIZE, SIZE, 3), np.uint8)
  long_q = [{"role": "user", "content": "x " * 60}, {"role": "assistant", "content": "ok"}]
  assert transforms.chat_example(long_q, [img], layout) == {}  # the image span would be cut
  two = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
  assert transforms.chat_example(two, [img, img], layout) == {}  # more images than I
  long_a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y " * 60}]
  ex = transforms.chat_example(long_a, [img], layout)
  assert len(ex["ids"]) == 40 and ex["loss"].any() and not ex["loss"][-1]
  rng = np.random.default_rng(0)
  assert transforms.generation_example("z " * 40, layout, rng, image=img) == {}
  with pytest.raises(ValueError, match="2 <image_placeholder> tags but 1 images"):
    transforms.chat_example([{"role": "user", "content": IMAGE_TAG * 2},
                             {"role": "assistant", "content": "a"}], [img], layout, "ds")
  # Text or a caption that spells an image tag would open an image slot with no image: dropped.
  for tag in (IMAGE_TAG, IMAGE_START_TAG, IMAGE_END_TAG):
    assert transforms.text_example(f"see {tag} here", layout) == {}
    assert transforms.generation_example(f"a {tag}", layout, rng, image=img) == {}
  assert transforms.generation_example("a cat", layout, rng, image=img)  # its own final tag is fine


# ------------------------------------------------------------------------------ packing, mixing

def test_packing(env):
  out = rows(env.pipeline((1, 1, 1), batch_size=4, pack=True), 40)
  eos, bos = env.tok.eos_id, env.tok.bos_id
  segments = 0
  for row in out:
    n_seg = int(row["segment_ids"].max())
    segments += n_seg
    used = int((row["segment_ids"] > 0).sum())
    assert (row["segment_ids"][:used] > 0).all() and not row["segment_ids"][used:].any()
    assert (np.diff(row["segment_ids"][:used]) >= 0).all()
    valid = row["image_valid"]
    assert valid.sum() <= 2 and (valid[:valid.sum()]).all()  # at most I, valid slots first
    assert row["image_mask"].sum() == N_UND * valid.sum()
    assert not row["pixels"][~valid].any() and all(row["pixels"][j].any()
                                                   for j in np.flatnonzero(valid))
    assert not row["loss_mask"][used:].any() and not row["image_mask"][used:].any()
    for s in range(1, n_seg + 1):
      seg = segment(row, s)
      n = len(seg["input_ids"])
      np.testing.assert_array_equal(seg["positions"], np.arange(n))
      assert seg["input_ids"][0] == bos and not seg["loss_mask"][-1]  # whole examples only
      np.testing.assert_array_equal(seg["targets"][:-1], seg["input_ids"][1:])
      task = seg["task"][0]
      assert (seg["task"] == task).all()
      if task == 2:
        assert seg["image_token_mask"][-N_GEN:].all() and seg["image_token_mask"].sum() == N_GEN
      else:
        assert seg["input_ids"][-1] == eos and not seg["image_token_mask"].any()
      assert seg["image_mask"].sum() % N_UND == 0
  assert segments / len(out) > 2  # rows really are packed


def test_mixture_proportions(env):
  out = rows(env.pipeline((2, 3, 5), batch_size=20, pack=False), 400)
  counts = np.bincount([r["task"][0] for r in out], minlength=3)
  np.testing.assert_allclose(counts / 400, [0.2, 0.3, 0.5], atol=0.02)
  # a zero-weight source is not read, and may be absent from the config
  c = env.config(pack=False)
  del c.sources["text"]
  it = make_pipeline(c, env.tok, FAMILY, seed=0, mixture={"understanding": 1, "generation": 1},
                     batch_size=8, image_tokenizer=fake_image_tokenizer)
  assert set(next(it)["task"][:, 0]) == {0, 2}


def test_determinism(env):
  def first(seed):
    it = env.pipeline((1, 1, 1), batch_size=2, seed=seed, read_threads=2)
    return [next(it) for _ in range(3)]
  a, b, c = first(0), first(0), first(1)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)
  assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_resume_from_state(env, tmp_path):
  def make():
    return env.pipeline((1, 1, 1), batch_size=2, pack=True, cfg_drop=0.5, read_threads=2,
                        und_max_shift=1)
  it = make()
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able
  expected = [next(it) for _ in range(6)]
  resumed = make()
  resumed.set_state(state)
  got = [next(resumed) for _ in range(6)]
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(expected, got) for k in KEYS)

  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  it = make()
  next(it)
  mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  restored = make()
  mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  got = [next(restored) for _ in range(3)]
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(expected, got) for k in KEYS)


def test_sharding(env):
  def texts(shard):
    it = make_pipeline(env.config(pack=False), env.tok, FAMILY, seed=3, mixture=(0, 1, 0),
                       batch_size=5, shard_index=shard, shard_count=2)
    return [env.decode(r["input_ids"][r["segment_ids"] > 0]) for r in rows(it, 10)]
  a, b = texts(0), texts(1)
  assert len(set(a)) == len(set(b)) == 10 and not set(a) & set(b)  # one epoch each, disjoint
  assert sorted(a + b) == sorted(BOS + t + EOS_TOKEN for t in TEXT_LINES)


def test_pretokenized_generation(env, tmp_path):
  """pretokenize_captions + pretokenized_key give exactly the batches of the per-batch image
  tokenizer (same order, same CFG drops), with the last, partial VQ batch padded."""
  n = len(env.source("captions"))
  assert n % 5, "the test wants a partial last batch"
  name = builders.pretokenize_captions(env.names["captions"], env.data_dir, tmp_path,
                                       fake_image_tokenizer, gen_image_size=SIZE,
                                       num_tokens=N_GEN, batch_size=5, config_name="t")
  assert name == "pretokenized_captions/t"
  stored = tfds.data_source(name, split="train", data_dir=str(tmp_path))
  assert len(stored) == n and stored[0]["image_ids"].dtype == np.int32

  def batches(pretokenized, **overrides):
    c = env.config(cfg_drop=0.5, **overrides)
    if pretokenized:
      c.sources.generation = dict(name=name, data_dir=str(tmp_path),
                                  features={"caption": "caption"}, pretokenized_key="image_ids")
    it = make_pipeline(c, env.tok, FAMILY, seed=0, mixture=(1, 1, 2), batch_size=2,
                       image_tokenizer=None if pretokenized else fake_image_tokenizer)
    return [next(it) for _ in range(4)]
  for a, b in zip(batches(False), batches(True, image_codebook_size=64)):
    assert all(np.array_equal(a[k], b[k]) for k in KEYS)
  # Ids stored by a larger VQ than the model's would be clamped by the embedding lookup: refused.
  biggest = max(int(ex["image_ids"].max()) for ex in stored)
  with pytest.raises(ValueError, match=rf"image-token id {biggest} is outside the VQ codebook of "
                                       rf"{biggest} \(data.image_codebook_size\)"):
    batches(True, image_codebook_size=biggest)

  with pytest.raises(KeyError, match="no feature 'picture'"):
    builders.pretokenize_captions(env.names["captions"], env.data_dir, tmp_path / "x",
                                  fake_image_tokenizer, gen_image_size=SIZE, num_tokens=N_GEN,
                                  image_key="picture")
  assert not list(tmp_path.glob("x/*/*/[0-9]*/dataset_info.json"))  # nothing half-built to read


# ------------------------------------------------------------------------------ errors

def test_clear_errors(env, tmp_path):
  def make(mixture=(0, 1, 0), **source):
    c = env.config()
    c.sources.text.update(source)
    return make_pipeline(c, env.tok, FAMILY, seed=0, mixture=mixture, batch_size=1)
  with pytest.raises(DatasetError, match=r"'no_such_set' is not built in data_dir .*built "
                                         r"there: chat_conversations/t, image_captions/t"):
    make(name="no_such_set")
  with pytest.raises(DatasetError, match=r"'text_files/t' has no feature 'txt' \(the text "
                                         r"source's 'text' key\); available keys: text"):
    make(features={"text": "txt"})
  with pytest.raises(DatasetError, match="no split 'validation'; splits: train"):
    make(split="validation")
  c = env.config()
  with pytest.raises(ValueError, match="needs an image_tokenizer"):
    make_pipeline(c, env.tok, FAMILY, seed=0, mixture=(0, 0, 1), batch_size=1)
  del c.sources["understanding"]
  with pytest.raises(DatasetError, match="data.sources.understanding names no dataset"):
    make_pipeline(c, env.tok, FAMILY, seed=0, mixture=(1, 0, 0), batch_size=1)

  if importlib.util.find_spec("tensorflow") is None:
    copy = tmp_path / "tfrec"
    shutil.copytree(env.data_dir / "text_files", copy / "text_files")
    info = next(copy.glob("text_files/t/*/dataset_info.json"))
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    with pytest.raises(DatasetError, match="install the `tensorflow` extra"):
      make(data_dir=str(copy))


def test_dropped_examples_are_counted_and_bad_examples_named(env, tmp_path, caplog):
  """Drops by the length policy used to be silent below grain's 90 %, an all-dropped source
  failed with grain's message naming neither source nor cause, and a corrupt image or a feature
  of the wrong kind failed with no dataset or example named."""
  with caplog.at_level(logging.WARNING):
    rows(env.pipeline((0, 0, 1), seq_len=17), 30)  # most captions need more than 17 tokens
  assert re.search(r"generation source 'image_captions/t': \d+ of the first 100 examples "
                   r"dropped \(\d+ %\): longer than seq_len=17", caplog.text), caplog.text
  with pytest.raises(DatasetError, match="generation source 'image_captions/t': all of the first "
                                         "200 examples were dropped: longer than seq_len=7"):
    next(env.pipeline((0, 0, 1), seq_len=7))
  c = env.config()
  c.sources.generation.features = {"image": "caption", "caption": "caption"}
  with pytest.raises(DatasetError, match=r"generation source 'image_captions/t' split 'train': "
                                         r"example \d+ of this host's stream cannot be read: "
                                         r"UnidentifiedImageError"):
    next(make_pipeline(c, env.tok, FAMILY, seed=0, mixture=(0, 0, 1), batch_size=1,
                       image_tokenizer=fake_image_tokenizer))
  # A cut image is refused when the dataset is built (it opened, and failed mid-run).
  jpeg = io.BytesIO()
  Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(jpeg, "JPEG")
  (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
  with pytest.raises(ValueError, match=r"cut.jpg cannot be decoded: OSError"):
    builders.image_bytes(tmp_path / "cut.jpg")
