"""The plumbing that train.py calls: stage selection and config checks (all before compiling),
the ways a stage gets its starting params, data wiring, metrics and memory reports."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from janus_jax import pretrained, sharding, training
from janus_jax.models import janus as janus_lib

# --- config checks ------------------------------------------------------------------------------


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
  """The stage table's stages in order (stage1, stage2, ...)."""
  names = [n for n in config.stages.keys() if n.startswith("stage")]
  return sorted(names, key=lambda n: int(n[len("stage"):]))


def stage_seed(config: ml_collections.ConfigDict, name: str) -> int:
  """The seed of one stage's data order and step randomness, mixed from config.seed and the
  stage's number: each stage builds a fresh pipeline, and with config.seed alone every stage
  would replay the same examples in the same order."""
  return int(np.random.SeedSequence([int(config.seed), int(name[len("stage"):])]).generate_state(1)[0])


def stages_to_run(config: ml_collections.ConfigDict) -> list[str]:
  """config.stage = 0: every stage of the table in order; k: only `stage{k}`."""
  names = stage_names(config)
  if config.stage == 0:
    return names
  name = f"stage{config.stage}"
  if name not in names:
    raise ValueError(f"--config.stage={config.stage}: unknown stage; the config defines "
                     f"{', '.join(names)} (or 0 for all)")
  return [name]


# Multi-host settings that only jax.distributed.initialize reads, and their "unset" values.
_DISTRIBUTED_FIELDS = (("coordinator_address", ""), ("num_processes", 0), ("process_id", -1))


def check_run(config: ml_collections.ConfigDict, stop_after: int = 0) -> None:
  """Run-wide settings, checked before anything starts (stage settings: check_stage)."""
  if config.get("keep_checkpoints", 1) < 1:  # orbax would delete every save, resume included
    raise ValueError(f"config.keep_checkpoints = {config.keep_checkpoints} must be at least 1")
  if stop_after < 0:
    raise ValueError(f"--stop_after = {stop_after} must be >= 0 (0: run each stage to its end)")
  if not config.get("distributed", False):
    given = [f"config.{k} = {config[k]!r}" for k, unset in _DISTRIBUTED_FIELDS
             if config.get(k, unset) != unset]
    if given:  # without initialize() each host would train alone into the same workdir
      raise ValueError(f"{', '.join(given)}: multi-host settings take effect only with "
                       "--config.distributed=True")
  if config.get("init_from", "") and not os.path.isdir(
      os.path.join(config.init_from, pretrained.CONVERTED_MARKER)):
    raise FileNotFoundError(
        f"config.init_from = {config.init_from!r} is not a converted checkpoint (no "
        f"{os.path.join(config.init_from, pretrained.CONVERTED_MARKER)}); convert a PyTorch one "
        "first: python -m janus_jax.convert SRC DST")
  if not config.get("prepare", None):  # (the digits demo builds its stage-0 outputs first)
    for field, what in (("init_vq_from", "trained VQ"),
                        ("init_understanding_encoder_from", "pretrained understanding encoder")):
      directory = config.get(field, "")
      if directory and not os.path.isdir(os.path.join(directory, "params")):
        raise FileNotFoundError(f"config.{field} = {directory!r} holds no {what} "
                                f"({os.path.join(directory, 'params')} is missing)")
  if config.get("init_vq_from", "") and os.path.isdir(os.path.join(config.init_vq_from, "params")):
    _check_saved_vq(config.init_vq_from, config.model.vq)


def data_fields_from_model(model: ml_collections.ConfigDict) -> dict[str, int]:
  """The data block's fields that must agree with the model (recipes.data_config sets them from
  it once, so a later --config.model.* override leaves them stale)."""
  vision, vq = model.vision, model.vq
  return {"image_size": vision.image_size,
          "num_image_tokens_und": (vision.image_size // vision.patch_size) ** 2,
          "num_image_tokens_gen": vq.grid_size**2,
          "gen_image_size": vq.grid_size * 2 ** (len(vq.channel_multipliers) - 1),
          "image_codebook_size": vq.codebook_size}


def check_stage(config: ml_collections.ConfigDict, name: str, mesh, data_ready: bool = True) -> None:
  """Everything about a stage that can be wrong, checked before anything compiles (the datasets
  too, unless a preparation step builds them first: then make_data checks them)."""
  stage = config.stages[name]
  training.check_trainable(stage.trainable)
  if stage.steps < 0 or stage.batch_size <= 0:
    raise ValueError(f"config.stages.{name}: steps must be >= 0 and batch_size > 0")
  if not 0 <= stage.warmup_steps <= stage.steps:
    raise ValueError(f"config.stages.{name}.warmup_steps = {stage.warmup_steps} must be in "
                     f"[0, steps = {stage.steps}]")
  for field in ("checkpoint_every", "log_every"):
    if config.get(field, 1) < 1:
      raise ValueError(f"config.{field} = {config[field]} must be at least 1")
  for field, want in data_fields_from_model(config.model).items():
    if field in config.data and config.data[field] != want:  # a stale count drops image features
      raise ValueError(f"config.data.{field} = {config.data[field]} disagrees with the model "
                       f"config, which gives {want}: pass --config.data.{field}={want} too")
  if not 0 <= stage.get("cooldown_steps", 0) <= stage.steps - stage.warmup_steps:
    raise ValueError(f"config.stages.{name}.cooldown_steps = {stage.cooldown_steps} must be in "
                     f"[0, steps - warmup_steps = {stage.steps - stage.warmup_steps}]")
  try:
    training.check_learning_rate_scales(stage)
    training.check_loss_weights(stage)
    training.check_image_label_smoothing(stage)
  except ValueError as e:
    raise ValueError(f"config.stages.{name}.{e}") from None
  shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
  if stage.batch_size % shards:
    raise ValueError(f"config.stages.{name}.batch_size = {stage.batch_size} is not divisible by "
                     f"the {shards} data shards of mesh {dict(mesh.shape)} (config.mesh)")
  sharding.process_rows(mesh, stage.batch_size)  # each host's rows are one aligned block
  if len(stage.mixture) != 3 or min(stage.mixture) < 0 or sum(stage.mixture) <= 0:
    raise ValueError(f"config.stages.{name}.mixture = {tuple(stage.mixture)}: need three "
                     "non-negative weights (understanding, text, text-to-image), not all zero")
  if data_ready:
    from janus_jax.data import pipeline

    pipeline.check_sources(config.data, tuple(stage.mixture))


# --- preparation (built-in demos) ---------------------------------------------------------------


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """config.compiler_options as the dict jax.jit / .compile take (None when empty)."""
  return dict(config.get("compiler_options", None) or {}) or None


def prepare(config: ml_collections.ConfigDict) -> None:
  """config.prepare.kind = "digits": build the digits datasets and tokenizer if missing, then
  stage 0 for whichever is not there yet: the VQ tokenizer (into config.init_vq_from), the
  training images' VQ ids (into config.prepare.pretokenize_to, if set) and the understanding
  encoder's pretraining (into config.init_understanding_encoder_from)."""
  spec = config.get("prepare", None)
  if not spec:
    return
  if spec.kind != "digits":
    raise ValueError(f"config.prepare.kind = {spec.kind!r}: the only built-in preparation is 'digits'")
  from janus_jax import encoder_pretraining, vq_training
  from janus_jax.data import builders, digits

  options = compiler_options(config)  # stage 0's steps compile as the train step does
  t0 = time.perf_counter()
  digits.prepare(spec.data_dir, config.tokenizer, image_size=spec.image_size, seed=spec.seed)
  print(f"digits data and tokenizer ready in {time.perf_counter() - t0:.1f} s")
  train_x, train_y = digits.load_split("train", spec.image_size, spec.seed)
  test_x, test_y = digits.load_split("test", spec.image_size, spec.seed)
  if os.path.isdir(os.path.join(config.init_vq_from, vq_training.PARAMS_DIR)):
    _check_saved_vq(config.init_vq_from, config.model.vq)
  else:
    print(f"=== stage0: VQ tokenizer, {spec.vq_steps} steps")
    metrics = vq_training.train_vq(config.model.vq, train_x, test_x, steps=spec.vq_steps,
                                   batch_size=spec.vq_batch_size,
                                   learning_rate=spec.vq_learning_rate, seed=spec.seed,
                                   out_dir=config.init_vq_from, compiler_options=options)
    print(f"stage0 VQ done in {metrics['total_seconds']:.0f} s: held-out PSNR "
          f"{metrics['psnr']:.1f} dB, codebook usage {metrics['codebook_usage']:.0%}")
  tokens_dir = spec.get("pretokenize_to", "")
  built = glob.glob(os.path.join(tokens_dir, digits.CAPTIONS_PRETOKENIZED, "[0-9]*", "dataset_info.json"))
  if tokens_dir and not built:  # ("incomplete.*" folders of an interrupted build do not count)
    t0 = time.perf_counter()  # the VQ is frozen from here on: encode every training image once
    vq_encode = make_vq_encoder(janus_lib.build(config.model),
                                {"generation_tokenizer": vq_training.load_vq(config.init_vq_from)},
                                options)
    builders.pretokenize_captions(
        digits.CAPTIONS, spec.data_dir, tokens_dir, vq_encode, gen_image_size=spec.image_size,
        num_tokens=config.data.num_image_tokens_gen, config_name=digits.PRETOKENIZED_CONFIG)
    print(f"stage0 VQ ids of the training images in {time.perf_counter() - t0:.1f} s: {tokens_dir}")
  encoder_dir = config.get("init_understanding_encoder_from", "")
  if encoder_dir and not os.path.isdir(os.path.join(encoder_dir, vq_training.PARAMS_DIR)):
    print(f"=== stage0: understanding encoder pretraining, {spec.encoder_steps} steps")
    metrics = encoder_pretraining.train_encoder(
        config.model.vision, train_x, train_y, test_x, test_y, steps=spec.encoder_steps,
        batch_size=spec.encoder_batch_size, learning_rate=spec.encoder_learning_rate,
        seed=spec.seed, out_dir=encoder_dir, head=spec.get("encoder_head", "map"),
        max_rotation=spec.get("encoder_max_rotation", 0.0),
        max_scale=spec.get("encoder_max_scale", 0.0),
        scan_layers=config.model.get("scan_layers", True),
        materialize_grad_transpose=config.model.get("materialize_grad_transpose", False),
        compiler_options=options)
    print(f"stage0 understanding encoder done in {metrics['seconds']:.0f} s: held-out "
          f"classifier accuracy {metrics['test_accuracy']:.1%}")


def _check_saved_vq(directory: str, want: ml_collections.ConfigDict) -> None:
  """A VQ stage 0 trained earlier is reused only if it is the model config's VQ."""
  from janus_jax import vq_training

  try:
    saved = vq_training.load_vq_config(directory).to_dict()
  except (OSError, ValueError) as e:
    raise ValueError(f"{directory} (config.init_vq_from) holds VQ params but no readable "
                     f"config.json: {e}") from e
  plain = lambda d: {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}
  saved, want = plain(saved), plain(want.to_dict())
  diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
  if diff:
    raise ValueError(f"{directory} (config.init_vq_from) holds a VQ trained with another config "
                     f"(saved vs config.model.vq: {diff}); point config.init_vq_from elsewhere "
                     "to train a new one, or remove it")


# --- tokenizer and starting params --------------------------------------------------------------


def tokenizer_dir(config: ml_collections.ConfigDict) -> str:
  directory = config.tokenizer or config.init_from
  if not directory:
    raise ValueError("set config.tokenizer (a directory with tokenizer.json or a *.model) or "
                     "config.init_from (a converted checkpoint that carries its tokenizer)")
  return directory


def load_tokenizer(config: ml_collections.ConfigDict):
  from janus_jax.tokenizer import Tokenizer

  return Tokenizer.from_dir(tokenizer_dir(config))


def init_state_from_rng(model, optimizer, trainable, rng) -> training.TrainState:
  """A train state from freshly initialised params (used under eval_shape for the shapes)."""
  params = janus_lib.init_params(model, rng)
  return training.init_state(optimizer, params, trainable, rng)


# Below this size a random init is drawn on the host (fast to start); above it, a jitted init
# writes each shard straight onto its devices.
HOST_INIT_MAX_PARAMS = 200_000_000


def _previous_stage(config, name: str) -> str | None:
  names = stage_names(config)
  i = names.index(name)
  return names[i - 1] if i > 0 else None


def initial_params(config, model, name: str, carried: Any, param_shardings: Any, mesh) -> Any:
  """Where a stage starts, in order: the previous stage's params (this run), the previous stage's
  exported model on disk ("init from" the last stage), config.init_from (a converted checkpoint,
  e.g. Janus-Pro-1B), random init. Resuming a stage itself is the checkpoint manager's job."""
  if carried is not None:
    return jax.device_put(carried, param_shardings)
  previous = _previous_stage(config, name)
  export = os.path.join(config.workdir, previous, "model") if previous else ""
  source = export if export and os.path.isdir(export) else config.init_from
  parts = [f for f in ("init_vq_from", "init_understanding_encoder_from") if config.get(f, "")]
  if source:
    print(f"{name} starts from {source}")
    params = pretrained.restore_params(source, model, mesh)
    if source == export:  # the previous stage's parts, stage 0's included, as it left them
      if parts:
        print(f"{name}: keeps {previous}'s generation tokenizer and understanding encoder "
              f"({', '.join('config.' + f for f in parts)}: only where a stage starts from "
              "config.init_from or random parameters)")
      return jax.device_put(params, param_shardings)
  else:
    params = _random_params(config, model, name, previous, export, param_shardings)
  if "init_vq_from" in parts:  # a separately trained VQ (stage 0) replaces the one loaded
    from janus_jax import vq_training

    print(f"{name}: generation tokenizer from {config.init_vq_from}")
    params = {**params, "generation_tokenizer": vq_training.load_vq(config.init_vq_from)}
  if "init_understanding_encoder_from" in parts:  # stage 0's stand-in for SigLIP
    from janus_jax import encoder_pretraining

    print(f"{name}: understanding encoder from {config.init_understanding_encoder_from}")
    params = {**params, "understanding_encoder":
              encoder_pretraining.load_encoder(config.init_understanding_encoder_from)}
  return jax.device_put(params, param_shardings)


def _random_params(config, model, name: str, previous: str | None, export: str,
                   param_shardings: Any) -> Any:
  print(f"{name} starts from random parameters (seed {config.seed})")
  if previous:  # running a later stage alone: say loudly that it is not continuing the table
    checkpoints = os.path.join(config.workdir, previous)
    hint = (f" ({checkpoints} holds {previous}'s checkpoints: running {previous} again resumes "
            "from them and exports it)" if os.path.isdir(checkpoints) else "")
    logging.warning("%s starts from random parameters: no export of %s at %s and no "
                    "config.init_from; run %s first or pass --config.init_from=DIR%s",
                    name, previous, export, previous, hint)
  if training.count_params(janus_lib.abstract_params(model)) < HOST_INIT_MAX_PARAMS:
    return janus_lib.init_params_host(model, config.seed)
  init = jax.jit(lambda rng: nn.unbox(janus_lib.init_params(model, rng)), out_shardings=param_shardings)
  return init(jax.random.key(config.seed))


def export_stage(config, name: str, model, params) -> str:
  path = os.path.join(config.workdir, name, "model")
  pretrained.write_converted(path, params, config.model, config.family, tokenizer_dir(config),
                             overwrite=True, extra=export_metadata(config))
  return path


def export_metadata(config) -> dict[str, Any]:
  """What sampling needs to prompt the model the way it was trained."""
  system = config.data.get("system_prompt", None)
  return {} if system is None else {"system_prompt": system}


# --- data ---------------------------------------------------------------------------------------


def make_vq_encoder(model: janus_lib.Janus, params: Any,
                    compiler_options: dict[str, Any] | None = None):
  """pixels [n, H, W, 3] in [-1, 1] -> VQ ids [n, h*w], jitted, with the frozen VQ params.

  Each host encodes its own examples on its first local device, with its own copy of the VQ
  params (gathered once; the train state's buffers are donated to every step anyway). So the
  encoder has no collectives: it runs in the data pipeline's prefetch thread (batch_prefetch)
  beside the train step without contending for the devices' collective order, and on several
  hosts each encodes its own pixels (over global arrays, a host's pixels would be taken as one
  replicated input, mixing the hosts' images).
  """
  apply = lambda p, x: model.apply({"params": p}, x, method=janus_lib.Janus.vq_encode)  # noqa: E731
  encode = jax.jit(apply, compiler_options=compiler_options or None)
  vq = params["generation_tokenizer"]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    # Only arrays spanning hosts are gathered: numpy (a stage-0 VQ) or host-local leaves are
    # whole already, and process_allgather would stack every host's copy.
    vq = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True)
                      if isinstance(x, jax.Array) and not x.is_fully_addressable else x, vq)
  device = jax.local_devices()[0]
  # Copied after the move: on one device device_put may hand back the state's own buffers.
  vq_params = {"generation_tokenizer": jax.tree.map(jnp.copy, jax.device_put(vq, device))}
  return lambda pixels: np.asarray(
      encode(vq_params, jax.device_put(np.asarray(pixels, np.float32), device)))


def make_data(config, name, mesh, tokenizer, vq_encode, data_state):
  """Stage `name`'s iterator over this host's rows of each global batch
  (`sharding.process_rows`: hosts that differ only along `tensor` hold, so read, the same rows)."""
  from janus_jax.data import pipeline

  stage = config.stages[name]
  shard_index, shard_count = sharding.process_rows(mesh, stage.batch_size)
  it = pipeline.make_pipeline(config.data, tokenizer, config.family, seed=stage_seed(config, name),
                              image_tokenizer=vq_encode, mixture=tuple(stage.mixture),
                              batch_size=stage.batch_size // shard_count,
                              shard_index=shard_index, shard_count=shard_count)
  if data_state:
    it.set_state(_this_process_state(data_state))
  return it


def data_state(it) -> dict[str, Any]:
  """Every host's iterator state, {"processes": [state of host 0, 1, ...]}: each host reads its
  own shard, and orbax writes the JSON item from the primary host only, so the states are
  gathered first (at checkpoint steps only)."""
  state = it.get_state()
  if jax.process_count() == 1:
    return {"processes": [state]}
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return {"processes": [json.loads(bytes(gathered[i, :sizes[i]])) for i in range(len(sizes))]}


def _this_process_state(saved: dict[str, Any]) -> dict[str, Any]:
  if "processes" not in saved:  # written before the states were gathered: one host's
    return saved
  states = saved["processes"]
  if len(states) != jax.process_count():
    raise ValueError(f"the checkpoint's data state comes from {len(states)} host(s) but this run "
                     f"has {jax.process_count()}: each host's position in its shard of the data "
                     "does not carry over to another host count")
  return states[jax.process_index()]


def global_batch(local: dict[str, np.ndarray], shardings: dict[str, Any], batch_size: int
                 ) -> dict[str, jax.Array]:
  """This host's rows (`make_data`) -> one global array of batch_size rows per key."""
  def one(k):
    x = np.asarray(local[k])
    return jax.make_array_from_process_local_data(shardings[k], x, (batch_size, *x.shape[1:]))
  return {k: one(k) for k in shardings}


# --- numbers ------------------------------------------------------------------------------------

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5p": 459e12,
              "TPU v5 lite": 197e12, "TPU v4": 275e12, "TPU v6 lite": 918e12}


def peak_flops(config) -> float:
  """Per-device peak FLOP/s: the config's, a table by device kind, or (CPU) a measured matmul."""
  if config.peak_flops_per_device:
    return float(config.peak_flops_per_device)
  kind = jax.devices()[0].device_kind
  for name, value in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return value
  return measure_matmul_flops() / jax.device_count()


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a square float32 matmul on the default device (the CPU ceiling MFU compares to)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def memory_report(compiled) -> str:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return "memory analysis unavailable"
  if m is None:
    return "memory analysis unavailable"
  gb = lambda x: x / 2**30  # noqa: E731
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return (f"per device: arguments {gb(m.argument_size_in_bytes):.2f} GiB, outputs "
          f"{gb(m.output_size_in_bytes):.2f} GiB, temporaries {gb(m.temp_size_in_bytes):.2f} GiB, "
          f"aliased {gb(m.alias_size_in_bytes):.2f} GiB, total {gb(total):.2f} GiB")


def check_finite(metrics: dict[str, jax.Array], step: int, manager) -> None:
  """Raises before a save when the step's loss or gradient norm is not finite: the loss is of
  the parameters before the update, so a finite loss with an inf/NaN gradient would otherwise
  checkpoint NaN parameters."""
  values = {k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics}
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    good = manager.all_steps()
    raise FloatingPointError(
        f"{', '.join(f'{k} is {v}' for k, v in bad.items())} at step {step}: stopping. The last "
        f"good checkpoint ({'step %d' % good[-1] if good else 'none'}) in {manager.directory} "
        "is untouched.")


class MetricsLogger:
  """Console progress bar, metrics.jsonl and TensorBoard events (process 0 only)."""

  def __init__(self, workdir: str, name: str, total: int, start: int, log_every: int = 1):
    self.enabled = jax.process_index() == 0
    self.log_every = log_every
    self.name = name
    self._bar = self._tb = self._file = None
    if self.enabled:
      from tqdm import tqdm
      from tensorboardX import SummaryWriter

      os.makedirs(workdir, exist_ok=True)
      self._bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True, mininterval=1.0)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)  # line-buffered

  def log(self, step: int, metrics: dict[str, jax.Array], seconds: float, flops: float, peak: float):
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(values["loss"]):
      raise FloatingPointError(f"loss is {values['loss']} at step {step}: stopping (no checkpoint "
                               "is written from a non-finite state)")
    values["tokens_per_second"] = values.pop("tokens") / seconds if "tokens" in values else 0.0
    values["mfu"] = flops / seconds / peak if peak else 0.0
    values["step_seconds"] = seconds
    if not self.enabled:
      return
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['learning_rate']:.1e}",
                          mfu=f"{values['mfu']:.1%}", refresh=False)
    self._file.write(json.dumps({"stage": self.name, "step": step, **values}) + "\n")
    if step % self.log_every == 0:
      for k, v in values.items():
        self._tb.add_scalar(f"{self.name}/{k}", v, step)

  def close(self):
    if self.enabled:
      self._bar.close()
      self._tb.close()
      self._file.close()
