"""Stage 0: train the generation tokenizer (`models.vq.VQModel`) on small images.

    metrics = train_vq(presets.vq(**digits.VQ), train_u8, test_u8, steps=250, batch_size=16,
                       learning_rate=3e-3, seed=0, out_dir="runs/digits/vq")
    vq_params = load_vq("runs/digits/vq")   # -> params["generation_tokenizer"] of a Janus

Losses (as LlamaGen, on the L2-normalised latents and codes the model quantises with):
reconstruction L2 + L1 on [-1, 1] pixels, codebook ||sg(z) - q||^2, commitment
beta ||z - sg(q)||^2, with the straight-through estimator z + sg(q - z) into the decoder. Codes
that the batches stop choosing (an exponential moving average of their counts falls below
`dead_fraction` of the uniform share) are re-initialised from the batch's latents every
`reinit_every` steps inside the jitted step, so usage stays high without a second compile.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from janus_jax.models import vq as vq_lib

PARAMS_DIR = "params"


def vq_model(vq_config: ml_collections.ConfigDict) -> vq_lib.VQModel:
  """The VQModel of a vq config (frozen, so the module hashes as a static jit argument)."""
  return vq_lib.VQModel(ml_collections.FrozenConfigDict(vq_config))


def as_channels(images_u8: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W] / [N, H, W, 1] / [N, H, W, 3] -> uint8 [N, H, W, C], C = 1 (grayscale) or 3."""
  x = np.asarray(images_u8)
  if x.dtype != np.uint8:
    raise TypeError(f"images must be uint8, got {x.dtype}")
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[1] != x.shape[2]:
    raise ValueError(f"images must be square [N, H, W], [N, H, W, 1] or [N, H, W, 3], got {x.shape}")
  return x


def to_pixels(images_u8: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 [N, H, W, C] in [-1, 1] (C as `as_channels`)."""
  return as_channels(images_u8).astype(np.float32) / 127.5 - 1.0


def _rgb(x_BxHxWxC: jax.Array) -> jax.Array:
  """The model reads RGB: grayscale is replicated to 3 channels (inside jit, so the host keeps
  and ships one channel)."""
  return jnp.repeat(x_BxHxWxC, 3, axis=-1) if x_BxHxWxC.shape[-1] == 1 else x_BxHxWxC


def init_vq_params(model: vq_lib.VQModel, image_size: int, seed: int) -> Any:
  """Numpy params drawn on the host (a jitted init compiles for tens of seconds on 2 cores):
  LeCun-normal conv kernels, zero biases, unit norm scales, a standard-normal codebook."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, image_size, image_size, 3))))
  flat = flax.traverse_util.flatten_dict(nn.unbox(shapes["params"]))
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat.items():
    name = path[-1]
    if name == "scale":
      value = np.ones(leaf.shape)
    elif name == "bias":
      value = np.zeros(leaf.shape)
    elif name == "codebook":
      value = rng.standard_normal(leaf.shape)
    else:  # conv kernel [kh, kw, in, out]
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    out[path] = value.astype(leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)


def _losses(model: vq_lib.VQModel, params: Any, x_BxHxWx3: jax.Array, beta: float,
            l1_weight: float) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array, jax.Array]]:
  """(total loss, (metrics, latents [B*h*w, e], ids [B*h*w]))."""
  def run(m: vq_lib.VQModel):
    z = m.encode_latents(x_BxHxWx3)
    ids, codes = m.quantize(z)
    z_st = z + jax.lax.stop_gradient(codes - z)  # straight-through: decoder gradient reaches z
    return z, ids, codes, m.codes_to_pixels(z_st)

  z, ids, codes, recon = model.apply({"params": params}, method=run)
  sg = jax.lax.stop_gradient
  l2 = jnp.mean(jnp.square(recon - x_BxHxWx3))
  l1 = jnp.mean(jnp.abs(recon - x_BxHxWx3))
  codebook = jnp.mean(jnp.square(codes - sg(z)))
  commitment = jnp.mean(jnp.square(z - sg(codes)))
  loss = l2 + l1_weight * l1 + codebook + beta * commitment
  metrics = {"loss": loss, "loss/l2": l2, "loss/l1": l1, "loss/codebook": codebook,
             "loss/commitment": commitment}
  return loss, (metrics, z.reshape(-1, z.shape[-1]), ids.reshape(-1))


def _train_step(state: dict[str, Any], x_BxHxWxC: jax.Array, rng: jax.Array, *, model, tx,
                beta: float, l1_weight: float, reinit_every: int, dead_fraction: float,
                ema_decay: float) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One adam step, then (every reinit_every steps) dead codes <- random latents of the batch."""
  x = _rgb(x_BxHxWxC)
  grads, (metrics, z_Nxe, ids_N) = jax.grad(_losses, argnums=1, has_aux=True)(
      model, state["params"], x, beta, l1_weight)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)

  k = model.config.codebook_size
  counts = jnp.zeros(k, jnp.float32).at[ids_N].add(1.0) / ids_N.shape[0]
  usage = ema_decay * state["usage"] + (1 - ema_decay) * counts
  step = state["step"] + 1
  dead = (usage < dead_fraction / k) & (step % reinit_every == 0)
  pick = jax.random.randint(rng, (k,), 0, z_Nxe.shape[0])
  codebook = params["codebook"]
  params["codebook"] = jnp.where(dead[:, None], jax.lax.stop_gradient(z_Nxe[pick]), codebook)
  # A revived code starts at the uniform share: unchosen, its usage decays below the threshold
  # in log(dead_fraction) / log(ema_decay) steps (~69 at the defaults), so a code that is
  # never picked is revived again at the first reinit step after that.
  usage = jnp.where(dead, 1.0 / k, usage)
  metrics["codes_reinitialised"] = dead.sum()
  metrics["batch_usage"] = (counts > 0).mean()
  return {"params": params, "opt_state": opt_state, "usage": usage, "step": step}, metrics


@functools.partial(jax.jit, static_argnames=("model",))
def _reconstruct(params: Any, x_BxHxWxC: jax.Array, *, model) -> tuple[jax.Array, jax.Array]:
  """(ids [B, h*w], uint8 reconstructions [B, H, W, C]; C = 1: the mean of the 3 channels)."""
  def run(m: vq_lib.VQModel):
    ids, codes = m.quantize(m.encode_latents(_rgb(x_BxHxWxC)))
    return ids, m.codes_to_pixels(codes).astype(jnp.float32)
  ids, pixels = model.apply({"params": params}, method=run)
  if x_BxHxWxC.shape[-1] == 1:
    pixels = jnp.mean(pixels, axis=-1, keepdims=True)
  return ids, jnp.clip(jnp.round((pixels + 1) * 127.5), 0, 255).astype(jnp.uint8)


def reconstruct(model: vq_lib.VQModel, params: Any, images_u8: np.ndarray,
                batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """(ids [N, h*w], uint8 reconstructions [N, H, W, C]) in fixed-size (padded) batches, so one
  compilation serves any N."""
  x = to_pixels(images_u8)
  n = len(x)
  x = np.concatenate([x, np.zeros((-n % batch_size, *x.shape[1:]), x.dtype)])
  ids, recon = [], []
  for i in range(0, len(x), batch_size):
    b_ids, b_recon = _reconstruct(params, jnp.asarray(x[i:i + batch_size]), model=model)
    ids.append(np.asarray(b_ids))
    recon.append(np.asarray(b_recon))
  return np.concatenate(ids)[:n], np.concatenate(recon)[:n]


def psnr(original_u8: np.ndarray, recon_u8: np.ndarray) -> float:
  """PSNR in dB on [0, 255] over the whole set (one MSE over every pixel)."""
  mse = np.mean(np.square(original_u8.astype(np.float64) - recon_u8.astype(np.float64)))
  return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def evaluate(model: vq_lib.VQModel, params: Any, images_u8: np.ndarray,
             batch_size: int = 100) -> dict[str, float]:
  """Held-out reconstruction PSNR (dB, over the whole padded image; grayscale inputs are scored
  against the mean of the 3 output channels) and codebook usage (fraction of codes used)."""
  ids, recon = reconstruct(model, params, images_u8, batch_size)
  return {"psnr": psnr(as_channels(images_u8), recon),
          "codebook_usage": float(len(np.unique(ids)) / model.config.codebook_size)}


def train_vq(vq_config: ml_collections.ConfigDict, images_train: np.ndarray,
             images_test: np.ndarray, *, steps: int, batch_size: int, learning_rate: float,
             seed: int, out_dir: str, beta: float = 0.25, l1_weight: float = 1.0,
             reinit_every: int = 25, dead_fraction: float = 0.03, ema_decay: float = 0.95,
             log_every: int = 50, compiler_options: dict[str, Any] | None = None
             ) -> dict[str, Any]:
  """Trains a VQModel on uint8 images [N, H, W] / [N, H, W, 1|3] (grayscale is replicated to RGB;
  inputs are scaled to [-1, 1]) and saves it to out_dir atomically: params/ (orbax),
  config.json, metrics.json, metrics.jsonl (one line per log_every steps, stage "stage0").

  compiler_options: XLA options for the step's compile (`config.compiler_options`).
  Returns the metrics: held-out psnr (dB) and codebook_usage, the final train losses, the seconds
  spent (train_seconds counts the compile), steps, and the test psnr before training.
  """
  if steps < 1:
    raise ValueError(f"VQ training steps = {steps} must be at least 1")
  t0 = time.time()
  x_train = to_pixels(images_train)  # [N, H, W, C]: grayscale stays 1 channel on the host
  x_test_u8 = as_channels(images_test)
  model = vq_model(vq_config)
  params = jax.tree.map(jnp.asarray, init_vq_params(model, x_train.shape[1], seed))
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1),
                                                     steps, learning_rate * 0.05))
  k = vq_config.codebook_size
  state = {"params": params, "opt_state": tx.init(params),
           # Zero usage: codes the first reinit_every steps never pick are revived at once.
           "usage": jnp.zeros((k,), jnp.float32), "step": jnp.int32(0)}
  key = jax.random.key(seed)
  # Compiled first, so that bad compiler options fail before any other work.
  step_fn = jax.jit(functools.partial(_train_step, model=model, tx=tx, beta=beta,
                                      l1_weight=l1_weight, reinit_every=reinit_every,
                                      dead_fraction=dead_fraction, ema_decay=ema_decay),
                    donate_argnums=0).lower(
      state, jax.ShapeDtypeStruct((batch_size, *x_train.shape[1:]), x_train.dtype), key
  ).compile(compiler_options=compiler_options or None)
  before = evaluate(model, params, x_test_u8)
  rng = np.random.default_rng(seed)
  log, running = [], None
  t_train, cpu_train = time.time(), time.process_time()
  for step in range(1, steps + 1):
    idx = rng.choice(len(x_train), batch_size, replace=False)
    state, metrics = step_fn(state, jnp.asarray(x_train[idx]), jax.random.fold_in(key, step))
    running = metrics if running is None else jax.tree.map(jnp.add, running, metrics)
    if step % log_every == 0 or step == steps:
      n = log_every if step % log_every == 0 else step % log_every
      values = {name: float(v) / n for name, v in jax.device_get(running).items()}
      values["codes_reinitialised"] *= n  # a count over the window, not a mean
      log.append({"stage": "stage0", "step": step, **values})
      running = None
  train_seconds, cpu_seconds = time.time() - t_train, time.process_time() - cpu_train
  if not np.isfinite(log[-1]["loss"]):  # a diverged VQ must not replace a saved one
    raise FloatingPointError(f"VQ training diverged: the last logged loss is {log[-1]['loss']}; "
                             f"nothing was written to {out_dir}")
  params = jax.device_get(state["params"])
  after = evaluate(model, params, x_test_u8)
  metrics = {**after, "psnr_before": before["psnr"], "steps": steps, "batch_size": batch_size,
             "final_train_loss": log[-1]["loss"], "final_train_l2": log[-1]["loss/l2"],
             "train_seconds": train_seconds, "train_cpu_seconds": cpu_seconds,
             "total_seconds": time.time() - t0,
             "grid": int(round(float(np.sqrt(_grid_tokens(model, x_train.shape[1]))))),
             "image_size": int(x_train.shape[1])}
  _save(out_dir, params, vq_config, metrics, log)
  return metrics


def _grid_tokens(model: vq_lib.VQModel, image_size: int) -> int:
  return (image_size // 2 ** (len(model.config.channel_multipliers) - 1)) ** 2


def _save(out_dir: str, params: Any, vq_config: ml_collections.ConfigDict,
          metrics: dict[str, Any], log: list[dict[str, Any]]) -> None:
  """Writes everything into a temporary sibling, then renames it over out_dir."""
  from janus_jax.pretrained import atomic_directory

  with atomic_directory(out_dir) as tmp:
    # Synchronous: the directory is renamed right after, so nothing may still be in flight.
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
        os.path.join(tmp, PARAMS_DIR), args=ocp.args.StandardSave(params))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(vq_config.to_dict(), f, indent=2, default=list)
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
    with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in log)


def load_vq(out_dir: str) -> Any:
  """The VQ params (numpy) saved by train_vq: the `generation_tokenizer` subtree of a Janus."""
  return load_params(out_dir, "trained VQ")


def load_params(out_dir: str, what: str) -> Any:
  """Numpy params from out_dir/params (a stage-0 output); `what` names it in the error."""
  path = os.path.join(os.path.abspath(out_dir), PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{out_dir} holds no {what} ({path} is missing)")
  restored = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
      path, args=ocp.args.StandardRestore())
  return jax.device_get(restored)


def load_vq_config(out_dir: str) -> ml_collections.ConfigDict:
  """The vq config train_vq saved with the params."""
  with open(os.path.join(out_dir, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  cfg.channel_multipliers = tuple(cfg.channel_multipliers)
  return cfg
