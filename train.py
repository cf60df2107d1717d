"""Three-stage Janus training on a ('data', 'fsdp', 'tensor') device mesh.

  python train.py                                   # the offline digits demo (configs/digits.py)
  python train.py --config=configs/janus_pro_1b.py --config.stage=2 --config.workdir=runs/pro1b

Reads top to bottom: config -> mesh -> model and tokenizer -> for each stage: data -> state
(resume / previous stage / init_from / random) -> compiled step -> loop -> final model export.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import time

import flax.linen as nn
import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from janus_jax import checkpointing, pretrained, sharding, training
from janus_jax import train_support as support
from janus_jax.models import janus as janus_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py"),
    "training config", lock_config=True)
_MAX_STEPS = flags.DEFINE_integer("stop_after", 0, "stop (with a checkpoint) after this many "
                                  "steps of the current stage; 0 = run the stage to its end")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO

  # --- config checks and mesh (before anything compiles) -------------------------------------
  support.check_run(config, _MAX_STEPS.value)
  if config.distributed:  # one process per host; each host reads only its shard of the data
    jax.distributed.initialize(config.coordinator_address or None, config.num_processes or None,
                               config.process_id if config.process_id >= 0 else None)
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
  stages = support.stages_to_run(config)
  mesh = sharding.make_mesh(config.mesh)
  for name in stages:
    support.check_stage(config, name, mesh, data_ready=not config.get("prepare", None))
  model = janus_lib.build(config.model)
  support.prepare(config)  # built-in demos: data, tokenizer, stage 0
  tokenizer = support.load_tokenizer(config)
  os.makedirs(config.workdir, exist_ok=True)
  with open(os.path.join(config.workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  params = None  # carried from one stage to the next
  preemption = checkpointing.PreemptionFlag()  # SIGTERM: save at the next step, then stop
  for name in stages:
    params = run_stage(config, name, mesh, model, tokenizer, params, preemption)
    if params is None:  # stopped early (preemption or --stop_after)
      return
    print(f"{name} done: {support.export_stage(config, name, model, params)}")
  last = support.stage_names(config)[-1]
  if stages[-1] != last:  # an earlier stage run alone must not replace the finished model
    print(f"{config.workdir}/model not written: it is {last}'s output; this run ended at "
          f"{stages[-1]} (its model: {os.path.join(config.workdir, stages[-1], 'model')})")
    return
  final = os.path.join(config.workdir, "model")
  pretrained.write_converted(final, params, config.model, config.family,
                             support.tokenizer_dir(config), overwrite=True,
                             extra=support.export_metadata(config))
  print(f"final model (sample.py --checkpoint): {final}")


def run_stage(config, name, mesh, model, tokenizer, carried_params, preemption):
  stage = config.stages[name]
  trainable = training.check_trainable(stage.trainable)
  loss_weights = training.check_loss_weights(stage)  # None: every supervised token counts once
  smoothing = training.check_image_label_smoothing(stage)
  workdir = os.path.join(config.workdir, name)
  print(f"=== {name}: trains {', '.join(trainable)}; lr {stage.learning_rate}, "
        f"{stage.steps} steps, batch {stage.batch_size}, mixture {tuple(stage.mixture)}"
        + (f", loss weights {loss_weights}" if loss_weights else "")
        + (f", image label smoothing {smoothing}" if smoothing else ""))

  # --- state: shapes and shardings from the logical axis rules ---------------------------------
  optimizer = training.make_optimizer(stage, config.optimizer)
  schedule = training.learning_rate_schedule(stage)
  abstract_state = jax.eval_shape(functools.partial(
      support.init_state_from_rng, model, optimizer, trainable), jax.random.key(config.seed))
  state_shardings = sharding.param_shardings(abstract_state, mesh)
  abstract_state = checkpointing.abstract_with_shardings(nn.unbox(abstract_state), state_shardings)

  manager = checkpointing.CheckpointManager(workdir, config.checkpoint_every, config.keep_checkpoints,
                                            config.async_checkpoints)
  restored = manager.restore(abstract_state) if manager.all_steps() else None
  if restored is not None:
    start, state, data_state = restored
    print(f"resuming {name} from step {start}")
  else:
    params = support.initial_params(config, model, name, carried_params, state_shardings.params, mesh)
    # Donated: the state takes over the params' buffers instead of holding a second copy.
    state = jax.jit(lambda p, rng: training.init_state(optimizer, p, trainable, rng),
                    out_shardings=state_shardings, donate_argnums=0)(
                        params, jax.random.key(support.stage_seed(config, name)))
    del params, carried_params
    start, data_state = 0, None
  if start >= stage.steps:
    manager.close()
    return state.params

  # --- data ------------------------------------------------------------------------------------
  vq_encode = support.make_vq_encoder(model, state.params, support.compiler_options(config))
  data = support.make_data(config, name, mesh, tokenizer, vq_encode, data_state)
  # The first batch before the step compiles (minutes at 7B): a source that cannot be read, or
  # whose examples are all dropped, fails now. `data` still holds the position checkpoints save.
  try:
    batches = itertools.chain([next(data)], data)
  except BaseException:
    data.close()
    manager.close()
    raise
  batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim)
                     for k, v in training.abstract_batch(config, stage.batch_size).items()}

  # --- the compiled step -----------------------------------------------------------------------
  step_fn = jax.jit(
      functools.partial(training.train_step, model=model, optimizer=optimizer, schedule=schedule,
                        trainable=trainable, loss_weights=loss_weights,
                        image_label_smoothing=smoothing),
      in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, None),
      donate_argnums=0)
  t0 = time.perf_counter()
  with sharding.mesh_rules(mesh):
    compiled = step_fn.lower(abstract_state, training.abstract_batch(config, stage.batch_size)
                             ).compile(compiler_options=support.compiler_options(config))
  print(f"compiled the {name} step in {time.perf_counter() - t0:.1f} s; "
        + support.memory_report(compiled))
  flops = training.flops_per_step(config, stage.batch_size, trainable)
  peak = support.peak_flops(config) * jax.device_count()

  # --- the loop --------------------------------------------------------------------------------
  logger = support.MetricsLogger(workdir, name, total=stage.steps, start=start,
                                 log_every=config.log_every)
  stop_at = min(stage.steps, start + _MAX_STEPS.value) if _MAX_STEPS.value else stage.steps
  pending, step, tick = None, start, time.perf_counter()
  try:
    while step < stop_at:
      batch = support.global_batch(next(batches), batch_shardings, stage.batch_size)
      state, metrics = compiled(state, batch)
      step += 1
      if pending is not None:  # fetch the previous step's metrics: the host never waits on this one
        logger.log(*pending)
      now = time.perf_counter()
      pending, tick = (step, metrics, now - tick, flops, peak), now
      preempted = preemption.reached(step)
      if step % config.checkpoint_every == 0 or step == stop_at or preempted:
        support.check_finite(metrics, step, manager)  # never save a NaN state
        manager.save(step, state, support.data_state(data), force=True)
      if preempted:
        break
    if pending is not None:
      logger.log(*pending)
  finally:
    manager.close()
    logger.close()
    data.close()  # stops the prefetch thread, which would otherwise hold its batches
  if step < stage.steps:
    print(f"stopped {name} at step {step} with a checkpoint; run again to resume")
    return None
  return state.params


if __name__ == "__main__":
  app.run(main)
  sys.exit(0)
