"""The train step and stage mechanics on synthetic batches (the data pipeline has its own tests)."""

from __future__ import annotations

import functools
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures
from janus_jax import sharding, training
from janus_jax import train_support as support
from janus_jax.models import janus as janus_lib
from janus_jax.models import llm
from test_model_shapes import load_config, tiny_params


@functools.lru_cache(maxsize=None)
def _setup(stage_name: str):
  config = load_config("tiny")
  # Adam's first steps move every parameter by about lr * sign(g): a gradient that is zero up to
  # float rounding would flip sign between reduction orders. A larger eps keeps such noise small,
  # so that comparing sharded and single-device steps tests the step, not rounding signs.
  config.optimizer.eps = 1e-3
  model = janus_lib.build(config.model)
  stage = config.stages[stage_name]
  trainable = training.check_trainable(stage.trainable)
  optimizer = training.make_optimizer(stage, config.optimizer)
  schedule = training.learning_rate_schedule(stage)
  step = functools.partial(training.train_step, model=model, optimizer=optimizer, schedule=schedule,
                           trainable=trainable)
  return config, model, optimizer, trainable, step, jax.jit(step)


def _run(stage_name, steps, mesh=None, batches=None):
  config, model, optimizer, trainable, step, jitted = _setup(stage_name)
  state = training.init_state(optimizer, tiny_params(), trainable, jax.random.key(0))
  batches = batches or [train_fixtures.synthetic_batch(config, 8, i) for i in range(steps)]
  if mesh is None:
    fn = jitted
  else:
    abstract = jax.eval_shape(functools.partial(support.init_state_from_rng, model, optimizer, trainable),
                              jax.random.key(0))
    state_sh = sharding.param_shardings(abstract, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batches[0].items()}
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
    state = jax.device_put(state, state_sh)
    with warnings.catch_warnings():
      warnings.simplefilter("error", DeprecationWarning)
      with sharding.mesh_rules(mesh):  # as train.py compiles: activation constraints bound
        lowered = jitted.lower(state, batches[0])
    # The model's nn.with_logical_constraint calls became sharding constraints (without the
    # context they are no-ops and the lowered step has none).
    assert lowered.as_text().count("sdy.sharding_constraint") > 0
    fn = lowered.compile()
  losses = []
  for batch in batches[:steps]:
    state, metrics = fn(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses, metrics


def test_sharded_step_equals_single_device():
  single, single_losses, _ = _run("stage3", 2)
  sharded, sharded_losses, _ = _run("stage3", 2, mesh=sharding.make_mesh((2, 2, 2)))
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(single.params["llm"]["lm_head"]["kernel"] - tiny_params()["llm"]["lm_head"]["kernel"]).max()) > 0


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1)])
def test_sharded_step_replicates_no_batch_tensor(mesh_shape, capfd):
  """Compiled as train.py compiles it, the step moves every activation between layouts with
  collectives: XLA's partitioner reports where it must replicate a whole tensor instead. Before,
  it replicated the token embeddings on a (2, 2, 2) mesh, and every image on every device when
  the patch grid's side (here 48 / 8 = 6) did not divide fsdp."""
  config = load_config("tiny")
  config.model.vision.image_size = 48
  model = janus_lib.build(config.model)
  stage = config.stages["stage3"]
  trainable = training.check_trainable(stage.trainable)
  optimizer = training.make_optimizer(stage, config.optimizer)
  mesh = sharding.make_mesh(mesh_shape)
  abstract = jax.eval_shape(functools.partial(support.init_state_from_rng, model, optimizer,
                                              trainable), jax.random.key(0))
  state_sh = sharding.param_shardings(abstract, mesh)
  batch = training.abstract_batch(config, 8)
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
  step = jax.jit(functools.partial(training.train_step, model=model, optimizer=optimizer,
                                   schedule=training.learning_rate_schedule(stage),
                                   trainable=trainable),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
  capfd.readouterr()
  with sharding.mesh_rules(mesh):
    step.lower(jax.eval_shape(lambda: nn.unbox(abstract)), batch).compile()
  log = capfd.readouterr().err
  assert "Involuntary full rematerialization" not in log, log[-3000:]


def test_loss_falls_on_a_tiny_dataset():
  config = _setup("stage3")[0]
  data = [train_fixtures.synthetic_batch(config, 8, i % 2) for i in range(16)]
  _, losses, metrics = _run("stage3", 16, batches=data)
  assert losses[-1] < 0.9 * losses[0] and np.mean(losses[-4:]) < np.mean(losses[:4]), losses
  for task in ("understanding", "text", "generation"):
    assert float(metrics[f"tokens/{task}"]) > 0 or task == "text"
    assert np.isfinite(float(metrics[f"loss/{task}"]))


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_frozen_parts_are_bit_identical_and_carry_no_optimizer_state(stage_name):
  trainable = _setup(stage_name)[3]
  start = tiny_params()
  state, _, _ = _run(stage_name, 3)
  for part in training.PARTS:
    same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(start[part]),
                                                    jax.tree.leaves(state.params[part])))
    assert same == (part not in trainable), part
  moments = state.opt_state[1][0].mu  # clip, then adamw's (scale_by_adam state).mu
  assert set(moments) == set(trainable)
  assert "generation_tokenizer" not in trainable


def test_stage_table_switches_trainable_sets_and_learning_rates():
  config = load_config("janus_pro_1b")
  s1, s2, s3 = (config.stages[f"stage{i}"] for i in (1, 2, 3))
  assert set(s2.trainable) - set(s1.trainable) == {"llm"}
  assert set(s3.trainable) - set(s2.trainable) == {"understanding_encoder"}
  assert all("generation_tokenizer" not in s.trainable for s in (s1, s2, s3))
  assert (s1.learning_rate, s2.learning_rate, s3.learning_rate) == (1e-3, 1e-4, 4e-5)
  assert (s1.batch_size, s2.batch_size, s3.batch_size) == (256, 512, 128)
  assert [tuple(s.mixture) for s in (s1, s2, s3)] == [(1, 0, 3), (2, 3, 5), (5, 1, 4)]
  assert load_config("janus_pro_7b").stages.stage3.steps == 40_000 and s3.steps == 80_000
  schedule = training.learning_rate_schedule(s1)
  assert float(schedule(0)) == 0 and float(schedule(300)) == pytest.approx(5e-4)
  assert float(schedule(600)) == pytest.approx(1e-3) and float(schedule(10_000)) == pytest.approx(1e-3)
  assert float(training.learning_rate_schedule(s3)(0)) == pytest.approx(4e-5)
  # Warm-up / stable / decay: the last cooldown_steps fall linearly to zero.
  s1.update(dict(steps=1000, warmup_steps=100, cooldown_steps=400))
  wsd = training.learning_rate_schedule(s1)
  assert [float(wsd(t)) for t in (50, 100, 600)] == pytest.approx([5e-4, 1e-3, 1e-3])
  assert [float(wsd(t)) for t in (800, 1000)] == pytest.approx([5e-4, 0.0], abs=1e-9)


def test_bad_stage_configs_fail_before_compiling():
  config = load_config("tiny")
  with pytest.raises(ValueError, match="unknown stage"):
    config.stage = 7
    support.stages_to_run(config)
  with pytest.raises(ValueError, match="needs 3 devices, but 8"):
    sharding.make_mesh((3, 1, 1))
  # What an ml_collections tuple flag lets through (--config.mesh=8, '(-1,8.5,1)', ...).
  for bad in [8, (0, -1, 1), (-1, 8.5, 1), (True, 8, 1), (-1, "8", 1), (-2, -4, 1), (8, 1)]:
    with pytest.raises(ValueError, match=r"\(config.mesh\) must be 3 integers"):
      sharding.make_mesh(bad)
  mesh = sharding.make_mesh((4, 2, 1))
  config.stages.stage1.batch_size = 12
  with pytest.raises(ValueError, match="batch_size = 12 is not divisible by the 8 data shards"):
    support.check_stage(config, "stage1", mesh)
  config.stages.stage1.batch_size = 8
  config.stages.stage1.trainable = ("llm", "generation_tokenizer")
  with pytest.raises(ValueError, match="frozen in every stage"):
    support.check_stage(config, "stage1", mesh)
  config.stages.stage1.trainable = ("llm", "vision_tower")
  with pytest.raises(ValueError, match="unknown trainable parts"):
    support.check_stage(config, "stage1", mesh)
  config.stages.stage1.trainable = ("llm",)
  config.stages.stage1.cooldown_steps = config.stages.stage1.steps + 1
  with pytest.raises(ValueError, match=r"stage1.cooldown_steps = \d+ must be in \[0, steps"):
    support.check_stage(config, "stage1", mesh)
  config.stages.stage1.cooldown_steps = 0
  config.stages.stage1.warmup_steps = config.stages.stage1.steps + 1
  with pytest.raises(ValueError, match=r"stage1.warmup_steps = \d+ must be in \[0, steps"):
    support.check_stage(config, "stage1", mesh)
  config.stages.stage1.warmup_steps = 0
  config.checkpoint_every = 0
  with pytest.raises(ValueError, match="config.checkpoint_every = 0 must be at least 1"):
    support.check_stage(config, "stage1", mesh)


def test_bad_run_settings_fail_before_anything_starts(tmp_path):
  """Settings that used to be ignored or to fail late: keep_checkpoints 0 (orbax kept no save),
  a negative --stop_after, multi-host fields without distributed=True (each host trained
  alone), a missing init_from (an AttributeError from orbax), a stale image-token count after a
  model override (the extra image features were dropped silently)."""
  config = load_config("tiny")
  support.check_run(config)
  for field, value, message in (
      ("keep_checkpoints", 0, "config.keep_checkpoints = 0 must be at least 1"),
      ("num_processes", 4, r"config.num_processes = 4: multi-host settings take effect only "
                           r"with --config.distributed=True"),
      ("coordinator_address", "host0:1234", "config.coordinator_address = 'host0:1234'"),
      ("init_from", str(tmp_path / "nowhere"), "config.init_from = .*nowhere' is not a converted "
                                               "checkpoint")):
    bad = config.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      support.check_run(bad)
  with pytest.raises(ValueError, match="--stop_after = -1 must be >= 0"):
    support.check_run(config, stop_after=-1)
  bad = config.copy_and_resolve_references()
  bad.num_processes, bad.distributed = 4, True  # fine: jax.distributed.initialize reads it
  support.check_run(bad)
  bad = config.copy_and_resolve_references()
  bad.init_vq_from = str(tmp_path / "no_vq")
  with pytest.raises(FileNotFoundError, match="config.init_vq_from = .*no_vq' holds no trained VQ"):
    support.check_run(bad)
  # A VQ trained under another config is not reused silently (stage 0 would skip training it).
  saved = tmp_path / "vq"
  (saved / "params").mkdir(parents=True)
  (saved / "config.json").write_text(json.dumps(config.model.vq.to_dict(), default=list))
  bad.init_vq_from = str(saved)
  support.check_run(bad)  # the same config: fine
  bad.model.vq.codebook_size *= 2
  with pytest.raises(ValueError, match=r"holds a VQ trained with another config .*codebook_size"):
    support.check_run(bad)

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  support.check_stage(config, "stage1", mesh, data_ready=False)
  bad = config.copy_and_resolve_references()
  bad.model.vision.patch_size //= 2  # 4x the patches; data.num_image_tokens_und left as it was
  want = (bad.model.vision.image_size // bad.model.vision.patch_size) ** 2
  with pytest.raises(ValueError, match=f"config.data.num_image_tokens_und = {want // 4} disagrees "
                                       f"with the model config, which gives {want}"):
    support.check_stage(bad, "stage1", mesh, data_ready=False)
  bad = config.copy_and_resolve_references()
  bad.data.image_size += 16
  with pytest.raises(ValueError, match="config.data.image_size"):
    support.check_stage(bad, "stage1", mesh, data_ready=False)


def test_a_nonfinite_gradient_stops_the_run_before_a_save_even_with_a_finite_loss():
  class Manager:  # what check_finite reads of checkpointing.CheckpointManager
    directory = "/ckpt"

    def all_steps(self):
      return [4]

  support.check_finite({"loss": jnp.float32(2.0), "grad_norm": jnp.float32(1.0)}, 6, Manager())
  with pytest.raises(FloatingPointError, match=r"grad_norm is inf at step 6: .*step 4\) in /ckpt"):
    support.check_finite({"loss": jnp.float32(2.0), "grad_norm": jnp.float32(np.inf)}, 6,
                         Manager())
  with pytest.raises(FloatingPointError, match="loss is nan"):
    support.check_finite({"loss": jnp.float32(np.nan)}, 6, Manager())


def test_analytic_flops_are_close_to_the_compiled_count():
  config, model, optimizer, trainable, _, jitted = _setup("stage3")
  state = training.init_state(optimizer, tiny_params(), trainable, jax.random.key(0))
  batch = train_fixtures.synthetic_batch(config, 8, 0)
  compiled = jitted.lower(state, batch).compile()
  xla = compiled.cost_analysis()
  xla = (xla[0] if isinstance(xla, list) else xla)["flops"]
  analytic = training.flops_per_step(config, 8, trainable)
  assert 0.5 < analytic / xla < 2.0, (analytic, xla)


def test_learning_rate_scales_scale_one_part_and_are_checked():
  """A part's scale s makes its update s times the unscaled one; the others are untouched."""
  config = load_config("tiny")
  config.optimizer.eps = 1e-3
  model = janus_lib.build(config.model)
  batch = train_fixtures.synthetic_batch(config, 8, 0)
  start = tiny_params()

  def one_step(scales):
    stage = config.stages.stage3.copy_and_resolve_references()
    stage.learning_rate_scales = scales
    stage.warmup_steps = 0  # a non-zero learning rate at step 0
    trainable = training.check_trainable(stage.trainable)
    optimizer = training.make_optimizer(stage, config.optimizer)
    step = jax.jit(functools.partial(
        training.train_step, model=model, optimizer=optimizer,
        schedule=training.learning_rate_schedule(stage), trainable=trainable))
    state = training.init_state(optimizer, start, trainable, jax.random.key(0))
    return jax.device_get(step(state, batch)[0].params)

  delta = lambda params, part: jax.tree.map(lambda a, b: a - b, params[part], start[part])
  plain, half, frozen = one_step({}), one_step({"understanding_encoder": 0.5}), one_step(
      {"understanding_encoder": 0.0})
  for a, b in zip(jax.tree.leaves(delta(half, "understanding_encoder")),
                  jax.tree.leaves(delta(plain, "understanding_encoder"))):
    np.testing.assert_allclose(a, 0.5 * b, atol=1e-7)
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(delta(plain, "understanding_encoder"))) > 1e-4
  for a, b in zip(jax.tree.leaves(frozen["understanding_encoder"]),
                  jax.tree.leaves(start["understanding_encoder"])):
    np.testing.assert_array_equal(a, b)
  for part in ("llm", "image_head", "understanding_aligner"):
    for a, b in zip(jax.tree.leaves(half[part]), jax.tree.leaves(plain[part])):
      np.testing.assert_array_equal(a, b)

  mesh = sharding.make_mesh((8, 1, 1))
  for scales, message in [({"understanding_encoder": 0.1}, r"stage2.learning_rate_scales .*trainable parts"),
                          ({"llm": -1.0}, r"stage2.learning_rate_scales \{'llm': -1.0\}")]:
    bad = load_config("tiny")
    bad.stages.stage2.learning_rate_scales = scales  # the encoder is frozen in stage 2
    with pytest.raises(ValueError, match=message):
      support.check_stage(bad, "stage2", mesh)
  # Every trainable part is listed at 1.0 (so a flag can set it), which changes nothing.
  stage2 = load_config("tiny").stages.stage2
  assert dict(stage2.learning_rate_scales) == {part: 1.0 for part in stage2.trainable}
  assert training.check_learning_rate_scales(stage2) == {}


def test_loss_weights_weight_each_tasks_tokens_and_are_checked():
  """With loss_weights (understanding, text, generation) the loss is the weighted mean of the
  per-token cross-entropies (computed here from token_losses); the per-task losses are unchanged;
  a weight of 0 removes that task's gradient."""
  config = load_config("tiny")
  model = janus_lib.build(config.model)
  params = tiny_params()
  batch = jax.tree.map(jnp.asarray, train_fixtures.synthetic_batch(config, 8, 0))
  task = np.asarray(batch["task"])
  mask = np.asarray(batch["loss_mask"], np.float64)
  assert all((mask * (task == t)).sum() > 0 for t in (0, 2))  # (no text fits the tiny rows)

  def trunk(m):
    return m(training.embed_batch(m, batch), batch["positions"],
             llm.segment_mask(batch["segment_ids"]))[0]

  hidden = model.apply({"params": params}, method=trunk)
  ce = np.asarray(training.token_losses(params, model, hidden, batch["targets"],
                                        batch["target_is_image"])[1], np.float64)
  loss_fn = jax.jit(training.loss_and_metrics, static_argnums=(1, 3))
  plain_loss, plain = loss_fn(params, model, batch, None)
  weights = (3.0, 0.5, 1.0)
  loss, metrics = loss_fn(params, model, batch, weights)
  w = mask * np.asarray(weights)[np.clip(task, 0, 2)]
  np.testing.assert_allclose(float(loss), (ce * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(plain_loss), (ce * mask).sum() / mask.sum(), rtol=1e-5)
  assert abs(float(loss) - float(plain_loss)) > 1e-3
  for t in training.TASKS:
    np.testing.assert_allclose(float(metrics[f"loss/{t}"]), float(plain[f"loss/{t}"]), rtol=1e-6)

  # Only generation counts: the understanding aligner (reached only through understanding
  # tokens' image placeholders) gets no gradient; with all weights 1 it does.
  grad = jax.jit(jax.grad(lambda p, lw: training.loss_and_metrics(p, model, batch, lw)[0]),
                 static_argnums=1)
  only_gen = grad(params, (0.0, 0.0, 1.0))["understanding_aligner"]
  every = grad(params, (1.0, 1.0, 1.0))["understanding_aligner"]
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(only_gen)) == 0.0
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(every)) > 0.0

  mesh = sharding.make_mesh((8, 1, 1))
  for weights, message in [((1.0, -1.0, 1.0), r"stage2.loss_weights = \(1.0, -1.0, 1.0\)"),
                           ((0.0, 0.0, 0.0), "at least one positive"),
                           ((1.0, 2.0), "need three weights")]:
    bad = load_config("tiny")
    bad.stages.stage2.loss_weights = weights
    with pytest.raises(ValueError, match=message):
      support.check_stage(bad, "stage2", mesh)


def test_image_label_smoothing_smooths_only_image_targets_and_is_checked():
  """image_label_smoothing eps: each image token's loss is the cross-entropy against
  (1 - eps) one-hot + eps uniform over the codebook (optax.smooth_labels, computed here from the
  image head's logits); text tokens and the per-task metrics (the plain cross-entropy) are
  unchanged; a value outside [0, 1) names the stage and field."""
  import optax

  config = load_config("tiny")
  model = janus_lib.build(config.model)
  params = dict(tiny_params())
  # A confident image head (random init is near uniform, where smoothing changes little).
  params["image_head"] = jax.tree.map(lambda w: 30 * w, params["image_head"])
  batch = jax.tree.map(jnp.asarray, train_fixtures.synthetic_batch(config, 8, 1))
  is_image = np.asarray(batch["target_is_image"])
  mask = np.asarray(batch["loss_mask"], np.float64)
  assert (mask * is_image).sum() > 0 and (mask * ~is_image).sum() > 0

  def trunk(m):
    return m(training.embed_batch(m, batch), batch["positions"],
             llm.segment_mask(batch["segment_ids"]))[0]

  hidden = model.apply({"params": params}, method=trunk)
  eps = 0.1
  loss_BxT, nll_BxT = training.token_losses(params, model, hidden, batch["targets"],
                                            batch["target_is_image"], eps)
  _, plain_BxT = training.token_losses(params, model, hidden, batch["targets"],
                                       batch["target_is_image"])
  np.testing.assert_array_equal(np.asarray(nll_BxT), np.asarray(plain_BxT))
  image_logits = model.apply({"params": params}, hidden, method=model.image_logits)
  codebook = image_logits.shape[-1]
  targets = jax.nn.one_hot(jnp.where(batch["target_is_image"], batch["targets"], 0), codebook)
  expected = np.asarray(optax.softmax_cross_entropy(image_logits.astype(jnp.float32),
                                                    optax.smooth_labels(targets, eps)))
  np.testing.assert_allclose(np.asarray(loss_BxT)[is_image], expected[is_image], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(loss_BxT)[~is_image], np.asarray(plain_BxT)[~is_image])

  loss_fn = jax.jit(training.loss_and_metrics, static_argnums=(1, 3, 4))
  plain_loss, plain = loss_fn(params, model, batch, None, 0.0)
  loss, metrics = loss_fn(params, model, batch, None, eps)
  np.testing.assert_allclose(float(loss), (np.asarray(loss_BxT) * mask).sum() / mask.sum(),
                             rtol=1e-5)
  assert abs(float(loss) - float(plain_loss)) > 1e-2, (float(loss), float(plain_loss))
  for t in training.TASKS:
    np.testing.assert_allclose(float(metrics[f"loss/{t}"]), float(plain[f"loss/{t}"]), rtol=1e-6)

  mesh = sharding.make_mesh((8, 1, 1))
  for value in (1.0, -0.1):
    bad = load_config("tiny")
    bad.stages.stage3.image_label_smoothing = value
    with pytest.raises(ValueError, match=rf"stage3.image_label_smoothing = {value}: need 0 <= eps"):
      support.check_stage(bad, "stage3", mesh)


def test_a_large_parameter_the_mesh_cannot_split_is_reported(caplog):
  """Replicating a big weight because its dimension does not divide the mesh costs memory on
  every device: param_shardings falls back, and says so for big leaves only."""
  import logging

  import flax.linen as nn

  mesh = sharding.make_mesh((1, 8, 1))
  big = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((12, 1 << 21), jnp.float32), ("embed", None))
  small = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((12, 4), jnp.float32), ("embed", None))
  with caplog.at_level(logging.WARNING):
    out = sharding.param_shardings({"big": big, "small": small}, mesh)
  assert out["big"].spec == out["small"].spec == jax.sharding.PartitionSpec(None, None)
  assert "['big'] (12, 2097152): dimension 0 (12) is not divisible" in caplog.text
  assert "small" not in caplog.text
