"""Training: the loss, the optimizer for a stage, the train state and the jitted step.

One step embeds a packed batch (text, understanding images at their placeholders, generated-image
tokens through the generation embedding), runs the LLM with a segment-aware causal mask, and takes
cross-entropy on text targets with the text head and on image-token targets with the image head.
Every supervised token counts once unless the stage sets `loss_weights` (understanding, text,
generation): then a token of task t counts w_t times (the loss is the weighted mean); each task's
own mean loss is reported either way.

A stage (see configs/) names its trainable parts; the step differentiates and optimises only
those, closing over the others as constants, so frozen parts get no gradient, carry no optimizer
state and stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from janus_jax.models import janus as janus_lib
from janus_jax.models import llm

PARTS = ("understanding_encoder", "understanding_aligner", "generation_tokenizer",
         "generation_embed", "generation_aligner", "image_head", "llm")
TASKS = ("understanding", "text", "generation")
BATCH_KEYS = ("input_ids", "image_token_mask", "image_mask", "pixels", "image_valid", "targets",
              "target_is_image", "loss_mask", "segment_ids", "positions", "task")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def check_trainable(trainable: Sequence[str]) -> tuple[str, ...]:
  """Validated trainable part names. The VQ (generation tokenizer) never trains."""
  unknown = set(trainable) - set(PARTS)
  if unknown:
    raise ValueError(f"unknown trainable parts {sorted(unknown)}; known: {list(PARTS)}")
  if "generation_tokenizer" in trainable:
    raise ValueError("the generation tokenizer (VQ) is frozen in every stage")
  if not trainable:
    raise ValueError("a stage must train at least one part")
  return tuple(p for p in PARTS if p in trainable)


def split_trainable(params: dict[str, Any], trainable: Sequence[str]) -> tuple[dict, dict]:
  """(trainable parts, frozen parts): gradients and optimizer state exist only for the first."""
  return ({k: v for k, v in params.items() if k in trainable},
          {k: v for k, v in params.items() if k not in trainable})


def learning_rate_schedule(stage: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up, then constant (the Janus-Pro recipe); with `cooldown_steps`, the last that
  many steps decay linearly to zero (warm-up / stable / decay)."""
  lr, warmup, cooldown = stage.learning_rate, stage.warmup_steps, stage.get("cooldown_steps", 0)
  pieces, boundaries = [], []
  if warmup > 0:
    pieces.append(optax.linear_schedule(0.0, lr, warmup))
    boundaries.append(warmup)
  pieces.append(optax.constant_schedule(lr))
  if cooldown > 0:
    boundaries.append(stage.steps - cooldown)
    pieces.append(optax.linear_schedule(lr, 0.0, cooldown))
  return pieces[0] if len(pieces) == 1 else optax.join_schedules(pieces, boundaries)


def make_optimizer(stage: ml_collections.ConfigDict, opt: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, over the trainable parts only.

  `stage.learning_rate_scales` ({part: s}) multiplies those parts' updates by s: their learning
  rate, and so their decoupled weight decay, is s times the stage's (e.g. a pretrained encoder
  fine-tuned gently while the LLM trains at full rate).
  """
  chain = [optax.clip_by_global_norm(opt.clip_norm),
           optax.adamw(learning_rate_schedule(stage), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay)]
  scales = check_learning_rate_scales(stage)
  if scales:  # (a stage without scales keeps the optimizer-state layout of earlier checkpoints)
    chain.append(optax.stateless(lambda updates, _: {
        part: jax.tree.map(lambda u, s=scales.get(part, 1.0): u * s, tree)
        for part, tree in updates.items()}))
  return optax.chain(*chain)


def check_loss_weights(stage: ml_collections.ConfigDict) -> tuple[float, float, float] | None:
  """The stage's per-task loss weights (understanding, text, generation), or None (all 1)."""
  weights = stage.get("loss_weights", None)
  if weights is None or tuple(weights) == (1.0, 1.0, 1.0):
    return None
  weights = tuple(float(w) for w in weights)
  if len(weights) != 3 or min(weights) < 0 or max(weights) <= 0:
    raise ValueError(f"loss_weights = {weights}: need three weights >= 0 (understanding, text, "
                     "generation), at least one positive")
  return weights


def check_learning_rate_scales(stage: ml_collections.ConfigDict) -> dict[str, float]:
  """The stage's {part: scale} without the unscaled (1.0) parts; each part must be one of its
  trainable parts, each scale >= 0."""
  scales = {k: float(v) for k, v in (stage.get("learning_rate_scales", None) or {}).items()
            if float(v) != 1.0}
  bad = {k: v for k, v in scales.items() if k not in stage.trainable or not v >= 0}
  if bad:
    raise ValueError(f"learning_rate_scales {bad}: each key must be one of the stage's trainable "
                     f"parts {list(stage.trainable)}, each scale >= 0")
  return scales


def embed_batch(m: janus_lib.Janus, batch: dict[str, jax.Array]) -> jax.Array:
  """Input embeddings [B, T, D]: text / understanding images / generated-image tokens."""
  image_tokens = batch["image_token_mask"]
  text_ids = jnp.where(image_tokens, 0, batch["input_ids"])
  x = m.embed_inputs(text_ids, batch["image_mask"], batch["pixels"], batch["image_valid"])
  codes = jnp.where(image_tokens, batch["input_ids"], 0)
  return jnp.where(image_tokens[..., None], m.embed_image_tokens(codes).astype(x.dtype), x)


def check_image_label_smoothing(stage: ml_collections.ConfigDict) -> float:
  """The stage's label smoothing of the image head's targets (0: plain cross-entropy)."""
  eps = float(stage.get("image_label_smoothing", 0.0))
  if not 0 <= eps < 1:
    raise ValueError(f"image_label_smoothing = {eps}: need 0 <= eps < 1")
  return eps


def _cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                   label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(loss, nll) per token: the cross-entropy against (1 - eps) one-hot + eps uniform, and the
  plain negative log-likelihood of the target (the same array when eps is 0)."""
  logits = logits_BxTxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = lse - jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  if not label_smoothing:
    return nll, nll
  return (1 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(-1)), nll


# Tokens per chunk of the two heads and their cross-entropy: the full-vocabulary logits of a
# whole batch (102,400 x tokens) would otherwise dominate training memory.
LOSS_CHUNK_TOKENS = 2048


def token_losses(params: Any, model: janus_lib.Janus, hidden_BxTxD: jax.Array,
                 targets_BxT: jax.Array, is_image_BxT: jax.Array,
                 image_label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(loss, nll) per token, each [B, T]: the text head for text targets, the image head for
  image targets; loss smooths the image targets' labels by image_label_smoothing (nll: the plain
  cross-entropy, the same array without smoothing). Computed LOSS_CHUNK_TOKENS at a time under
  `jax.checkpoint`, so no chunk's logits are kept for the backward pass."""
  b, t, d = hidden_BxTxD.shape
  n = b * t
  chunk = min(LOSS_CHUNK_TOKENS, n)
  pad = -n % chunk
  flat = lambda x: jnp.pad(x.reshape(n, *x.shape[2:]), [(0, pad)] + [(0, 0)] * (x.ndim - 2))

  @jax.checkpoint
  def one_chunk(args):
    h_CxD, targets_C, is_image_C = args
    text_logits, image_logits = model.apply(
        {"params": params}, method=lambda m: (m.text_logits(h_CxD), m.image_logits(h_CxD)))
    text_ce, _ = _cross_entropy(text_logits, jnp.where(is_image_C, 0, targets_C))
    image_loss, image_nll = _cross_entropy(image_logits, jnp.where(is_image_C, targets_C, 0),
                                           image_label_smoothing)
    return jnp.where(is_image_C, image_loss, text_ce), jnp.where(is_image_C, image_nll, text_ce)

  chunks = (flat(hidden_BxTxD).reshape(-1, chunk, d), flat(targets_BxT).reshape(-1, chunk),
            flat(is_image_BxT).reshape(-1, chunk))
  loss, nll = jax.lax.map(one_chunk, chunks)
  unchunk = lambda x: x.reshape(-1)[:n].reshape(b, t)
  return unchunk(loss), unchunk(nll)


def loss_and_metrics(params: Any, model: janus_lib.Janus, batch: dict[str, jax.Array],
                     loss_weights: Sequence[float] | None = None, image_label_smoothing: float = 0.0
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over every supervised token, each weighted by its task's entry of
  loss_weights (understanding, text, generation; None: all 1), the image tokens' labels smoothed
  by image_label_smoothing; plus each task's mean loss (the plain cross-entropy, comparable
  across runs) and token count."""

  def trunk(m: janus_lib.Janus):
    hidden, _ = m(embed_batch(m, batch), batch["positions"], llm.segment_mask(batch["segment_ids"]))
    return hidden

  hidden = model.apply({"params": params}, method=trunk)
  loss_BxT, ce_BxT = token_losses(params, model, hidden, batch["targets"],
                                  batch["target_is_image"], image_label_smoothing)
  mask = batch["loss_mask"].astype(jnp.float32)
  weight_BxT = mask
  if loss_weights is not None:  # (a Python branch: without weights the step is unchanged)
    weight_BxT = mask * jnp.asarray(loss_weights, jnp.float32)[jnp.clip(batch["task"], 0, 2)]
  loss = (loss_BxT * weight_BxT).sum() / jnp.maximum(weight_BxT.sum(), 1e-6)
  metrics = {"loss": loss, "supervised_tokens": mask.sum(),
             "tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32)}
  for i, task in enumerate(TASKS):
    task_mask = mask * (batch["task"] == i)
    metrics[f"loss/{task}"] = (ce_BxT * task_mask).sum() / jnp.maximum(task_mask.sum(), 1.0)
    metrics[f"tokens/{task}"] = task_mask.sum()
  return loss, metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: janus_lib.Janus,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               trainable: tuple[str, ...], loss_weights: tuple[float, float, float] | None = None,
               image_label_smoothing: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over the trainable parts (jit with a donated state; see train.py).
  loss_weights: per task (understanding, text, generation); image_label_smoothing: see
  `loss_and_metrics`.

  Frozen parts are closed over, not differentiated: no gradient work and they stay bit-identical.
  """
  train_params, frozen_params = split_trainable(state.params, trainable)

  def loss_fn(train_params):
    return loss_and_metrics({**frozen_params, **train_params}, model, batch, loss_weights,
                            image_label_smoothing)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_params)
  updates, opt_state = optimizer.update(grads, state.opt_state, train_params)
  train_params = optax.apply_updates(train_params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["learning_rate"] = schedule(state.step)
  rng, _ = jax.random.split(state.rng)
  return TrainState(state.step + 1, {**state.params, **train_params}, opt_state, rng), metrics


def init_state(optimizer: optax.GradientTransformation, params: dict[str, Any],
               trainable: tuple[str, ...], rng: jax.Array) -> TrainState:
  train_params, _ = split_trainable(params, trainable)
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(train_params), rng)


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global batch (the data pipeline's contract)."""
  t, i, s = config.data.seq_len, config.data.max_images_per_row, config.model.vision.image_size
  bt = (batch_size, t)
  return {"input_ids": jax.ShapeDtypeStruct(bt, jnp.int32),
          "image_token_mask": jax.ShapeDtypeStruct(bt, jnp.bool_),
          "image_mask": jax.ShapeDtypeStruct(bt, jnp.bool_),
          "pixels": jax.ShapeDtypeStruct((batch_size, i, s, s, 3), jnp.float32),
          "image_valid": jax.ShapeDtypeStruct((batch_size, i), jnp.bool_),
          "targets": jax.ShapeDtypeStruct(bt, jnp.int32),
          "target_is_image": jax.ShapeDtypeStruct(bt, jnp.bool_),
          "loss_mask": jax.ShapeDtypeStruct(bt, jnp.bool_),
          "segment_ids": jax.ShapeDtypeStruct(bt, jnp.int32),
          "positions": jax.ShapeDtypeStruct(bt, jnp.int32),
          "task": jax.ShapeDtypeStruct(bt, jnp.int32)}


def flops_per_step(config: ml_collections.ConfigDict, batch_size: int, trainable: Sequence[str]) -> float:
  """Analytic matmul FLOPs of one train step (forward 2N per token, backward 4N where weights
  train, 2N where only activation gradients flow), counting the LLM, both heads and attention.

  The understanding encoder is counted per image slot; the VQ is not run in the step.
  """
  c = config.model
  l, d, t = c.llm, c.llm.hidden_size, config.data.seq_len
  attn_proj = d * l.head_dim * (2 * l.num_heads + 2 * l.num_kv_heads)
  llm_params = l.num_layers * (attn_proj + 3 * d * l.mlp_dim)
  heads = d * l.vocab_size + c.image_head_dim * (d + c.vq.codebook_size)
  attention = l.num_layers * 2 * t * l.num_heads * l.head_dim  # QK^T and PV, causal half
  per_token_fwd = 2 * (llm_params + heads) + 2 * attention
  train_llm = "llm" in trainable
  backward = (2 if train_llm else 1) * per_token_fwd  # activation grads always reach the aligners
  v = c.vision
  vit_params = v.depth * (4 * v.width * v.width + 2 * v.width * v.mlp_dim)
  patches = (v.image_size // v.patch_size) ** 2
  vit_fwd = 2 * vit_params * patches * config.data.max_images_per_row
  vit_bwd = 2 * vit_fwd if "understanding_encoder" in trainable else 0
  return float(batch_size * (t * (per_token_fwd + backward) + vit_fwd + vit_bwd))


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params))))
