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
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from janus_jax import load_pretrained, sampling

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sample.py"),
    "sampling config", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint directory (overrides config)")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "text-to-image prompt (repeatable)")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "images per prompt")
_CFG = flags.DEFINE_float("cfg", None, "classifier-free guidance weight")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "sampling temperature (0 = greedy)")
_TOP_K = flags.DEFINE_integer("top_k", None, "top-k (0 = off)")
_TOP_P = flags.DEFINE_float("top_p", None, "top-p (1 = off)")
_SEED = flags.DEFINE_integer("seed", None, "PRNG seed")
_OUT = flags.DEFINE_string("out", None, "output directory for PNGs")
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


def _settings(c) -> tuple[dict, sampling.Sampler]:
  overrides = {"checkpoint": _CHECKPOINT.value, "num_images": _NUM_IMAGES.value,
               "cfg_weight": _CFG.value, "temperature": _TEMPERATURE.value, "top_k": _TOP_K.value,
               "top_p": _TOP_P.value, "seed": _SEED.value, "out": _OUT.value}
  s = {k: (v if v is not None else c[k]) for k, v in overrides.items()}
  return s, sampling.Sampler(s["temperature"], s["top_k"], s["top_p"])


def image_grid(images_NxHxWx3: np.ndarray, columns: int) -> np.ndarray:
  n, h, w, _ = images_NxHxWx3.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * h, columns * w, 3), np.uint8)
  for i, image in enumerate(images_NxHxWx3):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def text_to_image(loaded, prompts: list[str], s: dict, settings: sampling.Sampler) -> None:
  from PIL import Image

  batch = loaded.processor.generation_batch(prompts)
  n_tokens = loaded.config.vq.grid_size**2
  images = len(prompts) * s["num_images"]
  with phase(f"generating {images} image(s) x {n_tokens} tokens"):
    ids = sampling.generate_image_tokens(
        loaded.model, loaded.params, batch["input_ids"], batch["attention_mask"],
        rng=jax.random.key(s["seed"]), pad_id=loaded.tokenizer.pad_id, cfg_weight=s["cfg_weight"],
        settings=settings, images_per_prompt=s["num_images"]).block_until_ready()
  with phase("decoding pixels"):
    pixels = np.asarray(sampling.decode_images(loaded.model, loaded.params, ids))
  os.makedirs(s["out"], exist_ok=True)
  for i, image in enumerate(pixels):
    prompt_index, k = divmod(i, s["num_images"])
    Image.fromarray(image).save(os.path.join(s["out"], f"prompt{prompt_index}_{k}.png"))
  grid = os.path.join(s["out"], "grid.png")
  Image.fromarray(image_grid(pixels, s["num_images"])).save(grid)
  print(f"wrote {len(pixels)} image(s) and {grid}")


def answer(loaded, image_path: str, question: str, c, seed: int) -> str:
  from PIL import Image

  batch = loaded.processor.understanding_batch([question], [[Image.open(image_path)]])
  with phase("answering"):
    tokens, lengths = sampling.generate_text(
        loaded.model, loaded.params, batch["input_ids"], batch["attention_mask"],
        rng=jax.random.key(seed), max_new_tokens=c.max_new_tokens, eos_id=loaded.tokenizer.eos_id,
        settings=sampling.Sampler(temperature=c.answer_temperature),
        image_mask_BxT=batch["image_mask"], pixels=batch["pixels"], image_valid=batch["image_valid"])
  return loaded.tokenizer.decode(np.asarray(tokens[0, :int(lengths[0])]).tolist())


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  c = _CONFIG.value
  s, settings = _settings(c)
  if _QUESTION.value and not _IMAGE.value:
    raise app.UsageError("--question needs --image PATH")
  if not (_PROMPT.value or _IMAGE.value):
    raise app.UsageError("give --prompt TEXT (text-to-image) or --image PATH --question TEXT")
  if _IMAGE.value and not _QUESTION.value:
    raise app.UsageError("--image needs --question")
  if _IMAGE.value and not os.path.isfile(_IMAGE.value):
    raise app.UsageError(f"--image {_IMAGE.value!r}: no such file")
  if _PROMPT.value and not s["num_images"] >= 1:
    raise app.UsageError(f"--num_images={s['num_images']}: need at least 1 image per prompt")
  if not os.path.exists(os.path.join(s["checkpoint"], "config.json")):
    raise app.UsageError(f"no checkpoint at {s['checkpoint']!r}: run `python train.py` first, "
                         "or pass --checkpoint DIR")
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  with phase(f"loading {s['checkpoint']}"):
    loaded = load_pretrained(s["checkpoint"], dtype=c.dtype or None)
  if _IMAGE.value:
    print(answer(loaded, _IMAGE.value, _QUESTION.value, c, s["seed"]).strip())
  if _PROMPT.value:
    text_to_image(loaded, list(_PROMPT.value), s, settings)


if __name__ == "__main__":
  app.run(main)
