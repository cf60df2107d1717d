"""train.py as a user runs it (subprocesses, 2 CPU devices): resume after kill -9 and SIGTERM
reproduces an uninterrupted run exactly; a NaN stops the run and keeps the last good checkpoint;
a corrupt latest checkpoint falls back; checkpoints restore onto another mesh shape."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

import data_fixtures
from janus_jax import checkpointing, sharding, training
from janus_jax import train_support as support
from janus_jax.models import janus as janus_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "train_e2e_config.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  data_fixtures.build_all(root)
  data_fixtures.make_tokenizer(root)
  return root


def _env(root):
  return {**os.environ,  # (LLVM level 0 as conftest: these runs are mostly compiles)
          "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
          "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
          # The runs compile the same programs: share them through the persistent cache.
          "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _start(root, workdir, *flags):
  cmd = [sys.executable, str(REPO / "train.py"), f"--config={CONFIG}:{root}", "--config.stage=2",
         f"--config.workdir={workdir}", "--config.stages.stage2.steps=12", *flags]
  log = open(root / f"{pathlib.Path(workdir).name}.log", "a")
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(root), cwd=root)


def _losses(workdir) -> dict[int, float]:
  """step -> loss (the last record of a step wins: a resumed run rewrites the steps it redoes)."""
  path = pathlib.Path(workdir) / "stage2" / "metrics.jsonl"
  if not path.exists():
    return {}
  out = {}
  for line in path.read_text().splitlines():
    record = json.loads(line)
    out[record["step"]] = record["loss"]
  return out


def _wait_for_step(proc, workdir, step, timeout=400):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if max(_losses(workdir), default=0) >= step:
      return
    if proc.poll() is not None:
      raise AssertionError(f"train.py exited early with {proc.returncode}")
    time.sleep(0.1)
  raise AssertionError(f"step {step} not reached in {timeout} s")


def _log(root, name):
  return (root / f"{name}.log").read_text()


@pytest.fixture(scope="module")
def uninterrupted(root):
  workdir = root / "a"
  assert _start(root, workdir).wait(timeout=900) == 0, _log(root, "a")[-3000:]
  return workdir


def test_resume_after_kill_and_sigterm_matches_an_uninterrupted_run(root, uninterrupted):
  reference = _losses(uninterrupted)
  assert sorted(reference) == list(range(1, 13))
  assert "loss weights (2.0, 1.0, 1.0)" in _log(root, "a")
  workdir = root / "b"
  proc = _start(root, workdir)
  _wait_for_step(proc, workdir, 3)
  proc.kill()  # SIGKILL: no chance to save
  proc.wait()
  proc = _start(root, workdir)
  _wait_for_step(proc, workdir, 7)
  proc.send_signal(signal.SIGTERM)  # preemption: saves, then exits cleanly
  assert proc.wait(timeout=300) == 0, _log(root, "b")[-3000:]
  assert "stopped stage2 at step" in _log(root, "b")
  steps = checkpointing.CheckpointManager(str(workdir / "stage2"), 2, 2).all_steps()
  assert max(steps) >= 7  # the SIGTERM checkpoint is complete (it is the newest one listed)
  assert _start(root, workdir).wait(timeout=600) == 0, _log(root, "b")[-3000:]
  resumed = _losses(workdir)
  assert sorted(resumed) == sorted(reference)
  assert resumed == reference  # exactly: same data stream, same state, same compiled step
  assert (workdir / "model" / "params").is_dir() and (workdir / "stage2" / "model").is_dir()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(root):
  workdir = root / "nan"
  # The learning rate explodes after step 2 (warm-up towards 1e9): step 3's loss is NaN.
  proc = _start(root, workdir, "--config.stages.stage2.learning_rate=1e9",
                "--config.stages.stage2.warmup_steps=3")
  assert proc.wait(timeout=600) != 0
  log = _log(root, "nan")
  assert "FloatingPointError: loss is nan" in log, log[-3000:]
  steps = checkpointing.CheckpointManager(str(workdir / "stage2"), 2, 2).all_steps()
  assert steps == [2]
  assert all(np.isfinite(v) for s, v in _losses(workdir).items() if s <= 2)


def _abstract_state(config, mesh):
  model = janus_lib.build(config.model)
  stage = config.stages.stage2
  optimizer = training.make_optimizer(stage, config.optimizer)
  trainable = training.check_trainable(stage.trainable)
  abstract = jax.eval_shape(functools.partial(support.init_state_from_rng, model, optimizer, trainable),
                            jax.random.key(0))
  shardings = sharding.param_shardings(abstract, mesh)
  return checkpointing.abstract_with_shardings(nn.unbox(abstract), shardings)


def _plain(x) -> np.ndarray:
  if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(jax.device_get(x))


def _config(root):
  sys.path.insert(0, str(REPO / "tests"))
  import train_e2e_config

  return train_e2e_config.get_config(str(root))


def test_restore_onto_another_mesh_and_fall_back_from_a_corrupt_step(root, uninterrupted, tmp_path):
  import shutil

  config = _config(root)
  directory = tmp_path / "stage2"
  shutil.copytree(uninterrupted / "stage2", directory)
  manager = checkpointing.CheckpointManager(str(directory), 2, 2)
  assert manager.all_steps() == [10, 12]
  step, one, data_state = manager.restore(_abstract_state(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1])))
  assert step == 12 and data_state
  step, eight, _ = manager.restore(_abstract_state(config, sharding.make_mesh((2, 2, 2))))
  kernel = eight.params["llm"]["decoder"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_array_equal(_plain(a), _plain(b))
  # Corrupt every data file of the newest step: restore warns and takes step 10.
  for path in (directory / "12").rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and "state" in str(path):
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  manager = checkpointing.CheckpointManager(str(directory), 2, 2)
  step, state, data_state = manager.restore(_abstract_state(config, sharding.make_mesh((2, 2, 2))))
  assert step == 10
  # The unreadable step is kept aside, and the resumed run can write step 12 again.
  assert manager.all_steps() == [10] and (directory / "unreadable-12").is_dir()
  assert manager.save(12, state, data_state, force=True)
  manager.close()
  assert checkpointing.CheckpointManager(str(directory), 2, 2).all_steps() == [10, 12]


def test_an_earlier_stage_run_alone_keeps_the_final_model(root, uninterrupted, tmp_path):
  """WORKDIR/model (sample.py's default) is the last stage's: re-running stage 1 alone writes
  stage1/model and leaves it be (it used to replace it with stage 1's output)."""
  import shutil

  workdir = tmp_path / "w"
  shutil.copytree(uninterrupted / "model", workdir / "model")
  final = (workdir / "model").stat().st_ino, (workdir / "model" / "config.json").read_bytes()
  cmd = [sys.executable, str(REPO / "train.py"), f"--config={CONFIG}:{root}", "--config.stage=1",
         f"--config.workdir={workdir}", "--config.stages.stage1.steps=0"]
  run = subprocess.run(cmd, env=_env(root), cwd=root, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert (workdir / "stage1" / "model" / "params").is_dir()
  assert "model not written: it is stage2's output; this run ended at stage1" in run.stdout
  assert ((workdir / "model").stat().st_ino, (workdir / "model" / "config.json").read_bytes()) == final


def test_stage0_parts_apply_over_init_from_but_not_over_the_previous_export(root, tmp_path, capsys):
  """config.init_vq_from / init_understanding_encoder_from replace those parts of an init_from
  checkpoint (they were silently ignored); a stage continuing the previous stage's export keeps
  that export's parts, and says so."""
  import orbax.checkpoint as ocp

  from janus_jax import pretrained

  config = _config(root)
  config.workdir = str(tmp_path / "run")
  model = janus_lib.build(config.model)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  shardings = sharding.param_shardings(janus_lib.abstract_params(model), mesh)
  base, other = janus_lib.init_params_host(model, 0), janus_lib.init_params_host(model, 1)
  pretrained.write_converted(str(tmp_path / "base"), base, config.model, config.family,
                             config.tokenizer, overwrite=False)
  checkpointer = ocp.StandardCheckpointer()  # (as stage 0 saves them)
  for name, part in (("vq", "generation_tokenizer"), ("encoder", "understanding_encoder")):
    checkpointer.save(str(tmp_path / name / "params"), other[part])
  checkpointer.wait_until_finished()
  config.init_from = str(tmp_path / "base")
  config.init_vq_from, config.init_understanding_encoder_from = (str(tmp_path / "vq"),
                                                                str(tmp_path / "encoder"))

  def same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  params = support.initial_params(config, model, "stage1", None, shardings, mesh)
  assert same(params["llm"], base["llm"])
  assert same(params["generation_tokenizer"], other["generation_tokenizer"])
  assert same(params["understanding_encoder"], other["understanding_encoder"])
  pretrained.write_converted(os.path.join(config.workdir, "stage1", "model"), base, config.model,
                             config.family, config.tokenizer, overwrite=False)
  capsys.readouterr()
  params = support.initial_params(config, model, "stage2", None, shardings, mesh)
  assert same(params["generation_tokenizer"], base["generation_tokenizer"])
  assert same(params["understanding_encoder"], base["understanding_encoder"])
  assert "keeps stage1's generation tokenizer and understanding encoder" in capsys.readouterr().out


def test_each_stage_reads_its_own_order_of_the_data(root):
  """Each stage builds a fresh pipeline: seeded by config.seed alone, a stage with the same
  mixture would replay the previous stage's examples in the same order."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("e2e_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(str(root))
  for name in ("stage1", "stage2"):  # the same batch and mixture in both stages
    config.stages[name].batch_size, config.stages[name].mixture = 4, (1, 1, 1)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tokenizer = support.load_tokenizer(config)

  def first_ids(name):
    it = support.make_data(config, name, mesh, tokenizer, data_fixtures.fake_image_tokenizer, None)
    try:
      return np.concatenate([next(it)["input_ids"] for _ in range(3)])
    finally:
      it.close()
  stage1 = first_ids("stage1")
  np.testing.assert_array_equal(first_ids("stage1"), stage1)  # reproducible
  assert not np.array_equal(first_ids("stage2"), stage1)
