"""Image preprocessing (against a restatement of the reference recipe and transformers' Janus
image processor), the chat template strings, placeholder expansion and batching."""

import numpy as np
import pytest
from PIL import Image
from test_tokenizer import CORPUS, build_hf_json

from janus_jax import processing as P
from janus_jax import tokenizer as tk
from janus_jax.tokenizer import Tokenizer, train_sentencepiece

S = 64  # a small image_size keeps the comparisons fast; the recipe does not depend on it
SYS = P.SYSTEM_PROMPT


def reference_recipe(image, size=S, min_size=14):
  """The reference steps, written out independently: RGB, truncating resize, numpy padding."""
  img = image.convert("RGB")
  w, h = img.size
  m = max(w, h)
  nh, nw = max(int(h / m * size), min_size), max(int(w / m * size), min_size)
  x = np.asarray(img.resize((nw, nh), resample=Image.Resampling.BICUBIC))
  side = max(nh, nw)
  top, left = (side - nh) // 2, (side - nw) // 2
  out = np.full((side, side, 3), 127, np.uint8)
  out[top:top + nh, left:left + nw] = x
  return ((out / 255).astype(np.float32) - 0.5) / 0.5


def noise(h, w, c=3, seed=0):
  shape = (h, w, c) if c else (h, w)
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


IMAGES = {
    "1x1": Image.fromarray(noise(1, 1)),
    "5x3": Image.fromarray(noise(3, 5)),
    "tall": Image.fromarray(noise(90, 7)),
    "3000x200": Image.fromarray(noise(200, 3000)),
    "square": Image.fromarray(noise(50, 50)),
    "odd_pad": Image.fromarray(noise(41, 100)),
    "rgba": Image.fromarray(noise(20, 33, 4), "RGBA"),
    "gray": Image.fromarray(noise(17, 40, 0), "L"),
    "palette": Image.fromarray(noise(30, 20)).convert("P", palette=Image.Palette.ADAPTIVE),
    "exact": Image.fromarray(noise(S, S)),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_preprocess_matches_recipe(name):
  img = IMAGES[name]
  out = P.preprocess_image(img, S)
  assert out.shape == (S, S, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out, reference_recipe(img))
  assert out.min() >= -1 and out.max() <= 1


def test_preprocess_numpy_inputs_and_background():
  for arr in [noise(9, 13), noise(9, 13, 4), noise(9, 13, 0), noise(9, 13, 1)]:
    pil = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    np.testing.assert_array_equal(P.preprocess_image(arr, S), reference_recipe(pil))
  # 13 wide x 9 tall -> 64 x 44; 20 pad rows split 10 / 10, colour 127.
  out = P.preprocess_image(noise(9, 13), S)
  np.testing.assert_array_equal(out[:10], (np.float32(127 / 255) - 0.5) / 0.5)
  assert not np.all(out[10] == out[0])
  with pytest.raises(TypeError):
    P.preprocess_image(noise(4, 4).astype(np.float32))


def hf_processor():
  from transformers import JanusImageProcessorPil

  return JanusImageProcessorPil(size={"height": S, "width": S}, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3, do_normalize=True, min_size=14)


def test_against_transformers_where_sizes_agree():
  hf = hf_processor()
  assert tuple(hf.background_color) == (127, 127, 127)
  # Sizes where h / m * S is an integer or rounds down, so HF's round() equals int().
  for name in ["1x1", "5x3", "3000x200", "square", "exact", "tall"]:
    img = IMAGES[name].convert("RGB")
    ref = hf(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(P.preprocess_image(img, S), ref, atol=1e-5, rtol=0)


def test_against_transformers_where_rounding_differs():
  # 100 x 70 -> 44.8 rows: the reference truncates to 44, HF rounds to 45, a one-pixel shift.
  yy, xx = np.mgrid[0:70, 0:100]
  img = Image.fromarray(np.stack([xx * 2, yy * 3, xx + yy], -1).astype(np.uint8))
  ref = hf_processor()(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = P.preprocess_image(img, S)
  assert ours.shape == ref.shape == (S, S, 3)
  assert np.abs(ours - ref).mean() < 0.1 and not np.array_equal(ours, ref)


def test_postprocess_truncates():
  x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0, 2 * 200.9 / 255 - 1], np.float32)
  np.testing.assert_array_equal(P.postprocess(x), [0, 0, 127, 254, 255, 255, 200])
  assert P.Processor.postprocess(np.zeros((1, 2, 2, 3))).dtype == np.uint8


# ------------------------------------------------------------------------------ prompts

def test_prompt_strings():
  q, p = "What is in the image?", "A cute cat on a mat."
  assert P.understanding_prompt(q, "janus_pro") == \
      f"{SYS}\n\n<|User|>: <image_placeholder>\n{q}\n\n<|Assistant|>:"
  assert P.understanding_prompt(q, "janus") == \
      f"{SYS}\n\nUser: <image_placeholder>\n{q}\n\nAssistant:"
  assert P.generation_prompt(p, "janus_pro") == \
      f"<|User|>: {p}\n\n<|Assistant|>:<begin_of_image>"
  assert P.generation_prompt(f"  {p} \n", "janus") == f"User: {p}\n\nAssistant:<begin_of_image>"
  assert P.understanding_prompt(q, "janus_pro", num_images=2).count(tk.IMAGE_TAG) == 2
  assert SYS.startswith("You are a helpful language and vision assistant. You are able")
  assert SYS.endswith("with a variety of tasks using natural language.")


def test_multi_turn_and_raw_template():
  turns = [{"role": "user", "content": "<image_placeholder>\nq1"},
           {"role": "assistant", "content": " a1 "}, {"role": "User", "content": "q2"}]
  assert P.chat_prompt(turns, "janus_pro") == (
      f"{SYS}\n\n<|User|>: <image_placeholder>\nq1\n\n<|Assistant|>: a1<｜end▁of▁sentence｜>"
      "<|User|>: q2\n\n<|Assistant|>:")
  # Roles are written as given; the empty system prompt is omitted; the result is stripped.
  msgs = [{"role": "X", "content": " hi "}, {"role": "Y", "content": "yo"}]
  assert P.format_conversation(msgs) == "X: hi\n\nY: yo<｜end▁of▁sentence｜>"
  assert P.format_conversation(msgs[:1], "sys") == "sys\n\nX: hi"
  with pytest.raises(ValueError, match="family"):
    P.generation_prompt("x", "janus_flow")


# ------------------------------------------------------------------------------ batching

@pytest.fixture(scope="module", params=["hf", "sp"])
def tok(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(request.param)
  if request.param == "hf":
    build_hf_json(d)
  else:
    train_sentencepiece(CORPUS, 400, d / "tiny.model")
  return Tokenizer.from_dir(d)


def test_expand_placeholders(tok):
  ids = tok.encode(f"a{tk.IMAGE_TAG}\nb{tk.IMAGE_TAG}")
  out = P.expand_image_placeholders(ids, tok, 3)
  img, boi, eoi = tok.image_placeholder_id, tok.begin_of_image_id, tok.end_of_image_id
  assert len(out) == len(ids) + 2 * 4 and out.count(img) == 6
  k = ids.index(img)
  assert out[:k] == ids[:k] and out[k:k + 5] == [boi, img, img, img, eoi]
  assert out[k + 5] == ids[k + 1]  # the "\n" after the tag follows <end_of_image>


def test_understanding_batch(tok):
  n = 4
  proc = P.Processor(tok, "janus_pro", image_size=S, num_image_tokens=n)
  imgs = [[IMAGES["5x3"]], [], [IMAGES["tall"], IMAGES["rgba"]]]
  qs = ["What is it?", "Just text, a longer question than the others are", "Compare."]
  batch = proc.understanding_batch(qs, imgs)
  ids, valid, mask = batch["input_ids"], batch["attention_mask"], batch["image_mask"]
  assert ids.dtype == np.int32 and valid.dtype == mask.dtype == bool
  assert batch["pixels"].shape == (3, 2, S, S, 3)
  np.testing.assert_array_equal(batch["image_valid"], [[1, 0], [0, 0], [1, 1]])
  np.testing.assert_array_equal(mask.sum(1), [n, 0, 2 * n])
  assert not np.any(batch["pixels"][0, 1]) and not np.any(batch["pixels"][1])
  np.testing.assert_array_equal(batch["pixels"][2, 1], P.preprocess_image(IMAGES["rgba"], S))
  for b, (q, im) in enumerate(zip(qs, imgs)):
    row = P.expand_image_placeholders(
        tok.encode(P.understanding_prompt(q, "janus_pro", len(im))), tok, n)
    t = len(row)
    assert valid[b].sum() == t and valid[b, -t:].all()  # left padding
    assert ids[b, -t:].tolist() == row and (ids[b, :-t] == tok.pad_id).all()
    assert ids[b, -t] == tok.bos_id
  assert np.array_equal(mask, (ids == tok.image_placeholder_id) & valid)


def test_bucketing_and_errors(tok):
  proc = P.Processor(tok, "janus", image_size=S, num_image_tokens=2)
  batch = proc.generation_batch(["a red apple", "x"], pad_to_multiple=32)
  ids, valid = batch["input_ids"], batch["attention_mask"]
  assert ids.shape[1] % 32 == 0 and ids.dtype == np.int32
  assert (ids[:, -1] == tok.begin_of_image_id).all()
  for b in range(2):
    assert ids[b, valid[b].argmax()] == tok.bos_id and valid[b, valid[b].argmax():].all()
  longest = valid.sum(1).max()
  assert proc.generation_batch(["a red apple", "x"], 32, max_length=longest)["input_ids"].shape \
      == (2, longest)
  with pytest.raises(ValueError, match=f"{longest} tokens"):
    proc.generation_batch(["a red apple", "x"], max_length=longest - 1)
  with pytest.raises(ValueError, match="2 images"):
    proc.chat_batch([[{"role": "user", "content": "no tag"}]], [[IMAGES["1x1"]] * 2])


def test_chat_batch_multi_turn(tok):
  proc = P.Processor(tok, "janus_pro", image_size=S, num_image_tokens=3)
  conv = [{"role": "user", "content": f"{tk.IMAGE_TAG}\nq1"},
          {"role": "assistant", "content": "a1"},
          {"role": "user", "content": f"and {tk.IMAGE_TAG}?"}]
  batch = proc.chat_batch([conv], [[IMAGES["1x1"], IMAGES["gray"]]])
  assert batch["image_mask"].sum() == 6 and batch["image_valid"].all()
  text = tok.decode(batch["input_ids"][0], skip_special_tokens=False)
  # The separator after the assistant turn is the EOS token itself on both backends.
  assert f"a1{tk.EOS_TOKEN}{tk.USER_TAG}: and " in text
  assert (batch["input_ids"][0] == tok.eos_id).sum() == 1


def test_empty_images_and_batches_are_refused(tok):
  for image in (Image.new("RGB", (0, 5)), np.zeros((5, 0, 3), np.uint8), np.zeros((0, 0), np.uint8)):
    with pytest.raises(ValueError, match="both sides must be positive"):
      P.preprocess_image(image, S)
  proc = P.Processor(tok, "janus", image_size=S, num_image_tokens=2)
  with pytest.raises(ValueError, match="no prompts"):
    proc.generation_batch([])
