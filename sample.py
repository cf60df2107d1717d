"""Sample from a Janus checkpoint: text-to-image with classifier-free guidance, or answer a question
about an image.

  python sample.py --prompt "a handwritten digit seven" [--prompt ...] [--num_images 4] [--cfg 5]
  python sample.py --image digit.png --question "What digit is this?"
  python sample.py --checkpoint /path/to/converted/Janus-Pro-1B --prompt "a red apple"

--checkpoint takes a janus_jax directory (python -m janus_jax.convert) or a PyTorch one (converted
in memory). Every field of configs/sample.py is also settable as --config.FIELD=VALUE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from janus_jax import load_pretrained, sampling
from janus_jax.tokenizer import IMAGE_TAG

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sample.py"),
    "sampling config", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint directory (overrides config)")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "text-to-image prompt (repeatable)")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "images per prompt")
_CFG = flags.DEFINE_float("cfg", None, "classifier-free guidance weight")
_TEMPERATURE = flags.DEFINE_float("temperature", None,
                                   "text-to-image sampling temperature (0 = greedy); answers use "
                                   "--config.answer_temperature")
_TOP_K = flags.DEFINE_integer("top_k", None, "text-to-image top-k (0 = off)")
_TOP_P = flags.DEFINE_float("top_p", None, "text-to-image top-p (1 = off)")
_SEED = flags.DEFINE_integer("seed", None, "PRNG seed")
_OUT = flags.DEFINE_string("out", None, "output directory for PNGs and samples.json")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "replace the images and samples.json an earlier run left in --out")
_IMAGE = flags.DEFINE_string("image", None, "image to ask about")
_QUESTION = flags.DEFINE_string("question", None, "question about --image")

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_event(name: str, seconds: float, **_) -> None:
  if name in _COMPILE_EVENTS:
    _compile_seconds[0] += seconds


@contextlib.contextmanager
def phase(label: str):
  """Prints a phase with its wall time split into compile and run."""
  print(f"{label} ...", end="", flush=True, file=sys.stderr)
  start, compiled = time.perf_counter(), _compile_seconds[0]
  yield
  total = time.perf_counter() - start
  compile_s = _compile_seconds[0] - compiled
  print(f" {total:.2f} s (compile {compile_s:.2f} s, run {total - compile_s:.2f} s)",
        file=sys.stderr)


def _settings(c) -> tuple[dict, sampling.Sampler, sampling.Sampler]:
  """(settings, text-to-image sampler, answer sampler); UsageError naming a bad flag."""
  overrides = {"checkpoint": _CHECKPOINT.value, "num_images": _NUM_IMAGES.value,
               "cfg_weight": _CFG.value, "temperature": _TEMPERATURE.value, "top_k": _TOP_K.value,
               "top_p": _TOP_P.value, "seed": _SEED.value, "out": _OUT.value}
  s = {k: (v if v is not None else c[k]) for k, v in overrides.items()}
  try:
    image_sampler = sampling.Sampler(s["temperature"], s["top_k"], s["top_p"])
  except ValueError:
    raise app.UsageError(f"--temperature={s['temperature']} --top_k={s['top_k']} "
                         f"--top_p={s['top_p']}: need temperature >= 0, top_k >= 0, "
                         "0 < top_p <= 1") from None
  try:
    answer_sampler = sampling.Sampler(c.answer_temperature, c.answer_top_k, c.answer_top_p)
  except ValueError:
    raise app.UsageError(f"--config.answer_temperature={c.answer_temperature} "
                         f"--config.answer_top_k={c.answer_top_k} "
                         f"--config.answer_top_p={c.answer_top_p}: need temperature >= 0, "
                         "top_k >= 0, 0 < top_p <= 1") from None
  if not math.isfinite(s["cfg_weight"]):
    raise app.UsageError(f"--cfg={s['cfg_weight']}: the guidance weight must be finite")
  if not 0 <= s["seed"] < 2**32:  # jax.random.key keeps only 32 bits without x64
    raise app.UsageError(f"--seed={s['seed']}: must be in [0, 2**32)")
  if c.dtype not in ("", "bfloat16", "float32"):
    raise app.UsageError(f"--config.dtype={c.dtype!r}: expected '' (as stored), 'bfloat16' or "
                         "'float32'")
  if c.max_new_tokens < 1:
    raise app.UsageError(f"--config.max_new_tokens={c.max_new_tokens}: need at least 1")
  return s, image_sampler, answer_sampler


# The names a text-to-image run writes into --out (and all that --overwrite removes).
OUTPUT_NAMES = re.compile(r"prompt\d+_\d+\.png|grid\.png|samples\.json")


def _earlier_outputs(out: str) -> list[str]:
  return sorted(os.path.join(out, name) for name in os.listdir(out) if OUTPUT_NAMES.fullmatch(name))


def _check_out(out: str, overwrite: bool) -> None:
  """Before any work: --out must be a directory (or creatable) without an earlier run's images,
  unless --overwrite; so that a run never ends in a write error or a mix of two runs' files."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise app.UsageError(f"--out={out}: exists and is not a directory")
  existing = os.path.abspath(out)  # the part of the path that exists must let us create the rest
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise app.UsageError(f"--out={out}: cannot be created or written ({existing} is "
                         f"{'not a directory' if not os.path.isdir(existing) else 'not writable'})")
  earlier = _earlier_outputs(out) if os.path.isdir(out) else []
  if earlier and not overwrite:
    raise app.UsageError(f"--out={out} holds an earlier run's outputs "
                         f"({os.path.basename(earlier[0])}, ...): pass --overwrite to replace "
                         "them, or choose another --out")


def image_grid(images_NxHxWx3: np.ndarray, columns: int) -> np.ndarray:
  n, h, w, _ = images_NxHxWx3.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * h, columns * w, 3), np.uint8)
  for i, image in enumerate(images_NxHxWx3):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def text_to_image(loaded, prompts: list[str], s: dict, settings: sampling.Sampler) -> None:
  """Writes prompt{i}_{k}.png per image, grid.png (a row per prompt) and samples.json."""
  from PIL import Image

  batch = loaded.processor.generation_batch(prompts)
  n_tokens = loaded.config.vq.grid_size**2
  context = loaded.config.llm.max_position_embeddings
  if batch["input_ids"].shape[1] + n_tokens > context:
    raise app.UsageError(f"--prompt: the longest prompt is {batch['input_ids'].shape[1]} tokens; "
                         f"with the {n_tokens} image tokens that is over the model's context of "
                         f"{context}: shorten it")
  images = len(prompts) * s["num_images"]
  with phase(f"generating {images} image(s) x {n_tokens} tokens"):
    ids = sampling.generate_image_tokens(
        loaded.model, loaded.params, batch["input_ids"], batch["attention_mask"],
        rng=jax.random.key(s["seed"]), pad_id=loaded.tokenizer.pad_id, cfg_weight=s["cfg_weight"],
        settings=settings, images_per_prompt=s["num_images"]).block_until_ready()
  with phase("decoding pixels"):
    pixels = np.asarray(sampling.decode_images(loaded.model, loaded.params, ids))
  # Everything is written into a temporary folder inside --out first, then renamed into place,
  # and only then do the earlier run's other files go: a failed write leaves the earlier run.
  os.makedirs(s["out"], exist_ok=True)
  earlier = _earlier_outputs(s["out"])  # checked up front: only with --overwrite
  staging = tempfile.mkdtemp(prefix=".sample-", dir=s["out"])
  try:
    files = []
    for i, image in enumerate(pixels):
      prompt_index, k = divmod(i, s["num_images"])
      files.append(f"prompt{prompt_index}_{k}.png")
      Image.fromarray(image).save(os.path.join(staging, files[-1]))
    Image.fromarray(image_grid(pixels, s["num_images"])).save(os.path.join(staging, "grid.png"))
    record = {"checkpoint": os.path.abspath(s["checkpoint"]), "prompts": prompts,
              "images": {f: prompts[i // s["num_images"]] for i, f in enumerate(files)},
              **{k: s[k] for k in ("num_images", "cfg_weight", "seed")},
              **dataclasses.asdict(settings)}
    with open(os.path.join(staging, "samples.json"), "w") as f:
      json.dump(record, f, indent=2)
    written = files + ["grid.png", "samples.json"]
    for name in written:
      os.replace(os.path.join(staging, name), os.path.join(s["out"], name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  for path in earlier:
    if os.path.basename(path) not in written:
      os.remove(path)
  grid = os.path.join(s["out"], "grid.png")
  print(f"wrote {len(pixels)} image(s) and {grid}")


def answer(loaded, image_path: str, question: str, c, seed: int,
           settings: sampling.Sampler) -> str:
  from PIL import Image

  batch = loaded.processor.understanding_batch([question], [[Image.open(image_path)]])
  prompt_len, context = batch["input_ids"].shape[1], loaded.config.llm.max_position_embeddings
  if prompt_len >= context:
    raise app.UsageError(f"--question: the prompt is {prompt_len} tokens, which leaves no room "
                         f"in the model's context of {context}: shorten it")
  # The default (512, the reference's, for a 4096-token context) caps the answer; it is not a demand.
  max_new_tokens = min(c.max_new_tokens, context - prompt_len)
  if max_new_tokens < c.max_new_tokens:
    print(f"(--config.max_new_tokens={c.max_new_tokens} capped at {max_new_tokens}: the prompt's "
          f"{prompt_len} tokens leave that much of the model's context of {context})",
          file=sys.stderr)
  with phase("answering"):
    tokens, lengths = sampling.generate_text(
        loaded.model, loaded.params, batch["input_ids"], batch["attention_mask"],
        rng=jax.random.key(seed), max_new_tokens=max_new_tokens, eos_id=loaded.tokenizer.eos_id,
        settings=settings, image_mask_BxT=batch["image_mask"], pixels=batch["pixels"],
        image_valid=batch["image_valid"])
  ids = np.asarray(tokens[0, :int(lengths[0])]).tolist()
  if ids[-1] != loaded.tokenizer.eos_id:
    print(f"(the answer was cut at {max_new_tokens} tokens)",
          file=sys.stderr)
  return loaded.tokenizer.decode(ids)


def _check_image(path: str) -> None:
  from PIL import Image, UnidentifiedImageError

  if not os.path.isfile(path):
    raise app.UsageError(f"--image {path!r}: no such file")
  try:
    with Image.open(path) as image:
      image.verify()
    with Image.open(path) as image:  # verify() does not decode the data: a cut JPEG passes it
      image.load()
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise app.UsageError(f"--image {path!r}: not a readable image ({e})") from None


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  c = _CONFIG.value
  s, image_settings, answer_settings = _settings(c)
  if _QUESTION.value and not _IMAGE.value:
    raise app.UsageError("--question needs --image PATH")
  if not (_PROMPT.value or _IMAGE.value):
    raise app.UsageError("give --prompt TEXT (text-to-image) or --image PATH --question TEXT")
  if _IMAGE.value and not _QUESTION.value:
    raise app.UsageError("--image needs --question")
  if _IMAGE.value:
    _check_image(_IMAGE.value)
    if IMAGE_TAG in _QUESTION.value:  # the template adds the one tag --image fills
      raise app.UsageError(f"--question contains {IMAGE_TAG}: the prompt gets one for --image; "
                           "remove it from the question")
  if _PROMPT.value and not s["num_images"] >= 1:
    raise app.UsageError(f"--num_images={s['num_images']}: need at least 1 image per prompt")
  if _PROMPT.value:
    _check_out(s["out"], _OVERWRITE.value)
  if not os.path.exists(os.path.join(s["checkpoint"], "config.json")):
    raise app.UsageError(f"no checkpoint at {s['checkpoint']!r}: run `python train.py` first, "
                         "or pass --checkpoint DIR")
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  with phase(f"loading {s['checkpoint']}"):
    loaded = load_pretrained(s["checkpoint"], dtype=c.dtype or None)
  if _IMAGE.value:
    print(answer(loaded, _IMAGE.value, _QUESTION.value, c, s["seed"], answer_settings).strip())
  if _PROMPT.value:
    text_to_image(loaded, list(_PROMPT.value), s, image_settings)


if __name__ == "__main__":
  app.run(main)
