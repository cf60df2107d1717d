"""Evaluation of a Janus trained on the digits demo (janus_jax.data.digits).

    results = evaluate("runs/digits/model", out_dir="runs/digits/eval", run_dir="runs/digits")
    print(markdown_table(results))

* understanding: greedy answers to "What digit is this?" about every held-out digit, scored
  against the digit's name (after lower-casing and stripping punctuation);
* generation (GenEval-style): images drawn for "a handwritten digit {name}" at several CFG
  weights, labelled by a classifier trained on the REAL training digits (a small CNN,
  `digit_classifier`; its own held-out accuracy is reported), scored against the prompted digit;
* conditioning (deterministic, no sampling): the VQ tokens of every held-out digit scored under
  the ten digits' captions and the unconditional prompt; the caption with the highest likelihood
  labels the digit. Its accuracy tracks the CFG figures (which sample, so they are noisy) and
  separates two runs whose generation losses match: the loss is mostly about drawing any digit,
  the caption is worth at most log 10 = 2.3 nats of an image's ~110;
* a PNG grid of samples per CFG weight (one row per digit) and a PNG of the training losses
  read from the run's metrics.jsonl files.
The same image rng is used at every CFG weight, so the weights differ only by guidance.
"""

from __future__ import annotations

import functools
import json
import math
import os
import string
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from janus_jax import sampling, vq_training
from janus_jax.data import digits
from janus_jax.digit_classifier import DigitClassifier
from janus_jax.models import llm
from janus_jax.pretrained import Pretrained, load_pretrained

_PUNCT = str.maketrans("", "", string.punctuation)


def _per_digit(predicted: np.ndarray, labels: np.ndarray) -> list[float]:
  return [float(np.mean(predicted[labels == d] == d)) if np.any(labels == d) else math.nan
          for d in range(10)]


# ------------------------------------------------------------------------------ understanding

def normalize_answer(text: str) -> str:
  return " ".join(text.lower().translate(_PUNCT).split())


def understanding_accuracy(pre: Pretrained, images_u8: np.ndarray, labels: np.ndarray, *,
                           question: str = digits.QUESTION, system_prompt: str | None = None,
                           batch_size: int = 100, max_new_tokens: int = 4,
                           examples: int = 10) -> dict[str, Any]:
  """Greedy answers about each image [N, S, S] (uint8) vs NAMES[label].

  Batches have a fixed shape (the last is padded with repeats), so the prefill and decode loop
  compile once. system_prompt None: the processor's (the one the checkpoint was trained with).
  Returns accuracy, per_digit [10], and the first `examples` (label, answer) pairs.
  """
  system = pre.processor.system_prompt if system_prompt is None else system_prompt
  images_u8, labels = np.asarray(images_u8), np.asarray(labels)
  n = len(images_u8)
  answers: list[str] = []
  rng = jax.random.key(0)  # greedy: the key is unused
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n  # wraps around to fill the last batch
    batch = pre.processor.understanding_batch([question] * batch_size,
                                              [[images_u8[i]] for i in idx], system=system)
    tokens, lengths = sampling.generate_text(
        pre.model, pre.params, batch["input_ids"], batch["attention_mask"], rng=rng,
        max_new_tokens=max_new_tokens, eos_id=pre.tokenizer.eos_id, settings=sampling.GREEDY,
        image_mask_BxT=batch["image_mask"], pixels=batch["pixels"],
        image_valid=batch["image_valid"])
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for row in range(min(batch_size, n - start)):
      answers.append(pre.processor.decode(tokens[row, :lengths[row]]))
  predicted = np.array([digits.NAMES.index(a) if a in digits.NAMES else -1
                        for a in map(normalize_answer, answers)])
  return {"accuracy": float(np.mean(predicted == labels)), "per_digit": _per_digit(predicted, labels),
          "count": n, "examples": [[digits.NAMES[int(y)], a] for y, a in
                                   zip(labels[:examples], answers[:examples])]}


# ------------------------------------------------------------------------------ generation

def generate_digits(pre: Pretrained, *, images_per_digit: int, cfg_weight: float, seed: int,
                    temperature: float = 1.0, top_k: int = 0) -> np.ndarray:
  """uint8 grayscale images [10, images_per_digit, H, W] drawn for digits.generation_prompt(d).

  One batch of 10 * images_per_digit images; cfg_weight is traced by sampling.py, so every
  weight reuses one compilation."""
  batch = pre.processor.generation_batch([digits.generation_prompt(d) for d in range(10)])
  ids = sampling.generate_image_tokens(
      pre.model, pre.params, batch["input_ids"], batch["attention_mask"],
      rng=jax.random.key(seed), pad_id=pre.tokenizer.pad_id, cfg_weight=cfg_weight,
      settings=sampling.Sampler(temperature=temperature, top_k=top_k),
      images_per_prompt=images_per_digit)
  pixels = np.asarray(sampling.decode_images(pre.model, pre.params, ids))  # [10k, H, W, 3]
  gray = pixels.astype(np.float32).mean(axis=-1).round().astype(np.uint8)
  return gray.reshape(10, images_per_digit, *gray.shape[1:])


def generation_accuracy(pre: Pretrained, classifier: DigitClassifier, *,
                        cfg_weights: Sequence[float] = (1.0, 3.0, 5.0), images_per_digit: int = 10,
                        seed: int = 0, temperature: float = 1.0,
                        top_k: int = 0) -> tuple[dict[str, Any], dict[float, np.ndarray]]:
  """({str(weight): {accuracy, per_digit}}, {weight: images uint8 [10, k, H, W]})."""
  results, images = {}, {}
  for w in cfg_weights:
    imgs = generate_digits(pre, images_per_digit=images_per_digit, cfg_weight=w, seed=seed,
                           temperature=temperature, top_k=top_k)
    predicted = classifier.predict(imgs.reshape(-1, *imgs.shape[2:]))
    labels = np.repeat(np.arange(10), images_per_digit)
    results[str(float(w))] = {"accuracy": float(np.mean(predicted == labels)),
                              "per_digit": _per_digit(predicted, labels)}
    images[float(w)] = imgs
  return results, images


# ------------------------------------------------------------------------------ conditioning

def caption_log_likelihoods(pre: Pretrained, image_ids_NxL: np.ndarray, prompts: Sequence[str],
                            batch_size: int = 100) -> np.ndarray:
  """log p(image tokens | prompt) float32 [N, P + 1]: each image's L VQ ids, teacher-forced after
  each prompt's generation template, then after the unconditional row (last column: BOS and
  `<begin_of_image>` around pads, as CFG samples it). Sums of the image head's log-probabilities."""
  batch = pre.processor.generation_batch(list(prompts))
  rows, valid = sampling.cfg_rows(batch["input_ids"], batch["attention_mask"],
                                  pre.tokenizer.pad_id)
  prompts_PxT = np.concatenate([rows[0::2], rows[1:2]])  # the conditional rows + one uncond
  valid_PxT = np.concatenate([valid[0::2], valid[1:2]])
  ids = np.asarray(image_ids_NxL, np.int32)
  n = len(ids)
  ids = np.concatenate([ids, np.zeros((-n % batch_size, ids.shape[1]), np.int32)])
  out = [np.asarray(_score(pre.model, pre.params, jnp.asarray(prompts_PxT),
                           jnp.asarray(valid_PxT), jnp.asarray(ids[i:i + batch_size])))
         for i in range(0, len(ids), batch_size)]
  return np.concatenate(out)[:n]


@functools.partial(jax.jit, static_argnames=("model",))
def _score(model, params, prompts_PxT, valid_PxT, ids_BxL):
  b, t = ids_BxL.shape[0], prompts_PxT.shape[1]
  apply = functools.partial(model.apply, {"params": params})
  images_BxLxD = apply(ids_BxL[:, :-1], method=model.embed_image_tokens)

  def one_prompt(prompt_valid):
    prompt_T, valid_T = prompt_valid
    x = jnp.concatenate([apply(jnp.broadcast_to(prompt_T, (b, t)), method=model.embed_text),
                         images_BxLxD.astype(jnp.float32)], axis=1)
    valid = jnp.concatenate([jnp.broadcast_to(valid_T, (b, t)),
                             jnp.ones(ids_BxL[:, :-1].shape, bool)], axis=1)
    hidden, _ = apply(x, llm.positions_from_mask(valid), llm.causal_mask(valid))
    logp = jax.nn.log_softmax(apply(hidden[:, t - 1:], method=model.image_logits), axis=-1)
    return jnp.take_along_axis(logp, ids_BxL[..., None], axis=-1)[..., 0].sum(-1)  # [B]

  return jax.lax.map(one_prompt, (prompts_PxT, valid_PxT)).T  # [B, P]


def conditioning(pre: Pretrained, images_u8: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """Caption classification of real digits [N, S, S] by the text-to-image model: accuracy and
  per_digit of argmax_d log p(x | caption d); information_nats, the mean of log p(x | c) - log
  mean_d p(x | d) (a lower bound on I(image; digit), at most log 10); guidance_nats, the mean of
  log p(x | c) - log p(x | unconditional) (what CFG amplifies); nll_nats, the mean of
  -log p(x | c). c: the true digit's caption, `digits.generation_prompt`."""
  images_u8, labels = np.asarray(images_u8), np.asarray(labels)
  vq = vq_training.vq_model(pre.config.vq)
  ids, _ = vq_training.reconstruct(vq, pre.params["generation_tokenizer"], images_u8)
  scores = caption_log_likelihoods(pre, ids, [digits.generation_prompt(d) for d in range(10)])
  cond, uncond = scores[:, :10], scores[:, 10]
  true = cond[np.arange(len(labels)), labels]
  top = cond.max(axis=1)
  log_mean = top + np.log(np.exp(cond - top[:, None]).mean(axis=1))
  predicted = cond.argmax(axis=1)
  return {"accuracy": float(np.mean(predicted == labels)),
          "per_digit": _per_digit(predicted, labels), "count": len(labels),
          "information_nats": float(np.mean(true - log_mean)),
          "guidance_nats": float(np.mean(true - uncond)), "nll_nats": float(-np.mean(true))}


# ------------------------------------------------------------------------------ pictures

def save_grid(images_u8: np.ndarray, path: str | os.PathLike, scale: int = 2,
              labels: Sequence[str] = digits.NAMES) -> None:
  """images [rows, cols, H, W] uint8 -> a PNG grid, each row titled with its label."""
  rows, cols, h, w = images_u8.shape
  margin, gap = 48, 2
  cell_h, cell_w = h * scale + gap, w * scale + gap
  canvas = Image.new("L", (margin + cols * cell_w, rows * cell_h), 255)
  draw = ImageDraw.Draw(canvas)
  for r in range(rows):
    draw.text((4, r * cell_h + cell_h // 2 - 6), labels[r] if r < len(labels) else str(r), fill=0)
    for c in range(cols):
      tile = Image.fromarray(images_u8[r, c]).resize((w * scale, h * scale), Image.NEAREST)
      canvas.paste(tile, (margin + c * cell_w, r * cell_h))
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
  """{stage: lines sorted by step} from every metrics.jsonl under run_dir (a resumed run's
  repeated steps: the last line wins)."""
  stages: dict[str, dict[int, dict[str, Any]]] = {}
  for file in sorted(Path(run_dir).rglob("metrics.jsonl")):
    for line in file.read_text().splitlines():
      if line.strip():
        record = json.loads(line)
        stages.setdefault(str(record.get("stage", file.parent.name)), {})[int(record["step"])] = record
  return {s: [lines[k] for k in sorted(lines)] for s, lines in sorted(stages.items())}


def plot_losses(run_dir: str | os.PathLike, path: str | os.PathLike) -> list[str]:
  """One panel per stage: every `loss*` metric (total and per task) against the step. Returns
  the stages plotted (none: no file is written)."""
  stages = read_metrics(run_dir)
  if not stages:
    return []
  import matplotlib  # comes with mlxtend
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.4), squeeze=False)
  for ax, (stage, lines) in zip(axes[0], stages.items()):
    keys = sorted({k for line in lines for k in line if k.startswith("loss")})
    for key in keys:
      pts = [(line["step"], line[key]) for line in lines
             if isinstance(line.get(key), (int, float)) and math.isfinite(line[key])]
      if pts:
        ax.plot(*zip(*pts), label=key.removeprefix("loss/") if key != "loss" else "total",
                linestyle="--" if key == "loss" else "-")
    ax.set_title(stage)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("loss")
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return list(stages)


# ------------------------------------------------------------------------------ the whole eval

def evaluate(checkpoint: str | Pretrained, *, out_dir: str, data_dir: str | None = None,
             run_dir: str | None = None, seed: int = 0, split_seed: int = 0,
             cfg_weights: Sequence[float] = (1.0, 3.0, 5.0), images_per_digit: int = 10,
             und_batch: int = 100, und_limit: int | None = None,
             system_prompt: str | None = None, temperature: float = 1.0,
             top_k: int = 0, classifier_steps: int = 1500) -> dict[str, Any]:
  """Runs everything and writes out_dir/{results.json, samples_cfg{w}.png, losses.png}.

  checkpoint: a directory for load_pretrained (or a loaded Pretrained). The digits split is the
  one digits.prepare stored (its manifest in data_dir gives image size and seed; without it: the
  model's image size and `split_seed`, digits.prepare's default 0 -- never the sampling `seed`,
  which would score on digits the model trained on). und_limit: score only the first N test images.
  classifier_steps: the judge's training steps (1,500: 98.2 % on the real held-out digits, ~30 s
  on two CPU cores; 300: 97.0 %, ~7 s).
  """
  t0 = time.time()
  pre = load_pretrained(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
  image_size = pre.config.vision.image_size
  manifest = Path(data_dir or "") / "digits_prepare.json"
  if data_dir and manifest.is_file():
    built = json.loads(manifest.read_text())
    image_size, split_seed = built["image_size"], built["seed"]
  train_x, train_y = digits.load_split("train", image_size, split_seed)
  test_x, test_y = digits.load_split("test", image_size, split_seed)
  split = {"image_size": image_size, "seed": split_seed,
           "from": str(manifest) if data_dir and manifest.is_file() else "split_seed"}
  gen_side = pre.config.vq.grid_size * 2 ** (len(pre.config.vq.channel_multipliers) - 1)

  t = time.time()
  classifier = DigitClassifier(seed, steps=classifier_steps).fit(_resize(train_x, gen_side),
                                                                 train_y)
  results: dict[str, Any] = {"classifier": {
      "kind": "cnn", "steps": classifier_steps,
      "test_accuracy": classifier.accuracy(_resize(test_x, gen_side), test_y),
      "seconds": time.time() - t}}

  t = time.time()
  n = und_limit or len(test_x)
  results["understanding"] = understanding_accuracy(
      pre, test_x[:n], test_y[:n], system_prompt=system_prompt, batch_size=min(und_batch, n))
  results["understanding"]["seconds"] = time.time() - t

  t = time.time()
  results["conditioning"] = conditioning(pre, _resize(test_x[:n], gen_side), test_y[:n])
  results["conditioning"]["seconds"] = time.time() - t

  t = time.time()
  gen, images = generation_accuracy(pre, classifier, cfg_weights=cfg_weights,
                                    images_per_digit=images_per_digit, seed=seed,
                                    temperature=temperature, top_k=top_k)
  results["generation"] = {"cfg": gen, "images_per_digit": images_per_digit,
                           "prompt": digits.CAPTION_TEMPLATES[0], "temperature": temperature,
                           "top_k": top_k, "seconds": time.time() - t}
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = []
  for w, imgs in images.items():
    name = f"samples_cfg{w:g}.png"
    save_grid(imgs, out / name)
    files.append(name)
  if run_dir and plot_losses(run_dir, out / "losses.png"):
    files.append("losses.png")
  results["files"] = files
  results["split"] = split
  results["seconds"] = time.time() - t0
  (out / "results.json").write_text(json.dumps(results, indent=2))
  return results


def _resize(images_u8: np.ndarray, side: int) -> np.ndarray:
  """[N, S, S] -> [N, side, side] (bilinear) when the generated size differs from the data's."""
  if images_u8.shape[1] == side:
    return images_u8
  return np.stack([np.asarray(Image.fromarray(x).resize((side, side), Image.BILINEAR))
                   for x in images_u8])


def markdown_table(results: dict[str, Any]) -> str:
  """Per-digit and overall accuracies: understanding, then generation per CFG weight."""
  head = "| task | " + " | ".join(digits.NAMES) + " | all |"
  rule = "|" + " --- |" * 12
  fmt = lambda xs: " | ".join("-" if math.isnan(x) else f"{100 * x:.0f}" for x in xs)  # noqa: E731
  und = results["understanding"]
  rows = [head, rule, f"| understanding (greedy) | {fmt(und['per_digit'])} | "
                      f"**{100 * und['accuracy']:.1f}** |"]
  for w, r in results["generation"]["cfg"].items():
    rows.append(f"| generation, CFG {float(w):g} | {fmt(r['per_digit'])} | "
                f"**{100 * r['accuracy']:.1f}** |")
  notes = ""
  if "conditioning" in results:
    c = results["conditioning"]
    rows.append(f"| caption classification | {fmt(c['per_digit'])} | "
                f"**{100 * c['accuracy']:.1f}** |")
    notes = (f" Caption classification: the held-out digits labelled by the caption under which "
             f"the text-to-image model finds them likeliest (no sampling); captions carry "
             f"{c['information_nats']:.2f} of at most 2.30 nats per image, and "
             f"log p(x | caption) - log p(x) = {c['guidance_nats']:.2f} nats.")
  clf = results["classifier"]["test_accuracy"]
  return "\n".join(rows) + (f"\n\nAccuracies in %. Generation is scored by a digit classifier "
                            f"trained on the real training digits ({100 * clf:.1f}% on the "
                            "real held-out digits)." + notes)
