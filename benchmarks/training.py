"""Training benchmarks, measured in one run.

(1) MFU of the train step on this machine: analytic FLOPs per step / step time, as a ratio to a
    float32 matmul rate measured in the same process (the practical CPU ceiling).
(2) Ahead-of-time compile of the Janus-Pro-7B stage-2 step for a large fake CPU mesh (abstract
    inputs: nothing is allocated): per-device memory from `memory_analysis()` and compile seconds.
    Tries N = 256 fake devices first, then smaller N until one compiles within the time limit.

  python benchmarks/training.py [--skip_aot] [--aot_devices 256,128,64] [--out results.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def _mfu_config():
  from janus_jax import recipes
  from janus_jax.models import presets

  model = presets.janus(
      presets.llm(512, 4, 8, 1536, vocab_size=8192, max_position_embeddings=1024),
      presets.vision(image_size=64, patch_size=16, width=256, depth=2, num_heads=4, mlp_dim=1024),
      presets.vq(codebook_size=1024, codebook_dim=8, z_channels=32, base_channels=32,
                 channel_multipliers=(1, 2), num_res_blocks=1, grid_size=8))
  stages = recipes.janus_pro_stages(1)
  config = recipes.training_config(model, stages)
  config.model.dtype = "float32"
  config.model.remat_policy = "none"
  config.data.seq_len = 512
  config.data.max_images_per_row = 1
  return config


def measure_mfu(steps: int = 5, batch_size: int = 4) -> dict:
  import jax
  import train_fixtures
  from janus_jax import train_support, training
  from janus_jax.models import janus as janus_lib

  config = _mfu_config()
  results = {}
  for name in ("stage2", "stage3"):
    stage = config.stages[name]
    model = janus_lib.build(config.model)
    trainable = training.check_trainable(stage.trainable)
    optimizer = training.make_optimizer(stage, config.optimizer)
    step = jax.jit(functools.partial(training.train_step, model=model, optimizer=optimizer,
                                     schedule=training.learning_rate_schedule(stage),
                                     trainable=trainable), donate_argnums=0)
    params = jax.tree.map(jax.numpy.asarray, janus_lib.init_params_host(model, 0))
    state = training.init_state(optimizer, params, trainable, jax.random.key(0))
    batch = jax.tree.map(jax.numpy.asarray, train_fixtures.synthetic_batch(config, batch_size, 0))
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    flops = training.flops_per_step(config, batch_size, trainable)
    matmul = train_support.measure_matmul_flops(2048, 3)
    step_s = sorted(times)[len(times) // 2]
    results[name] = dict(step_seconds=step_s, compile_seconds=compile_s, step_gflop=flops / 1e9,
                         achieved_gflops=flops / step_s / 1e9, matmul_gflops=matmul / 1e9,
                         mfu_vs_matmul=flops / step_s / matmul)
  return results


AOT_SCRIPT = r"""
import functools, json, sys, time
import jax, flax.linen as nn
sys.path.insert(0, {repo!r})
from janus_jax import checkpointing, sharding, training, train_support
from janus_jax.models import janus as janus_lib
import importlib.util
spec = importlib.util.spec_from_file_location("cfg", {config!r}); cfg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cfg); config = cfg.get_config()
for item in filter(None, {overrides!r}.split(",")):
  key, value = item.split("=")
  *path, leaf = key.split("."); node = config
  for p in path: node = node[p]
  node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], str) else value
n = jax.device_count(); fsdp = min(n, 16); mesh = sharding.make_mesh((n // fsdp, fsdp, 1))
stage = config.stages.stage2
model = janus_lib.build(config.model)
trainable = training.check_trainable(stage.trainable)
optimizer = training.make_optimizer(stage, config.optimizer)
abstract = jax.eval_shape(functools.partial(train_support.init_state_from_rng, model, optimizer, trainable), jax.random.key(0))
state_sh = sharding.param_shardings(abstract, mesh)
abstract = checkpointing.abstract_with_shardings(nn.unbox(abstract), state_sh)
batch = training.abstract_batch(config, stage.batch_size)
batch_sh = {{k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}}
step = jax.jit(functools.partial(training.train_step, model=model, optimizer=optimizer,
               schedule=training.learning_rate_schedule(stage), trainable=trainable),
               in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
t0 = time.perf_counter()
with sharding.mesh_rules(mesh):  # as train.py compiles it: the activations' logical constraints bound
  compiled = step.lower(abstract, batch).compile()
seconds = time.perf_counter() - t0
m = compiled.memory_analysis()
total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
print("RESULT " + json.dumps(dict(devices=n, mesh=dict(mesh.shape), batch=stage.batch_size,
      seq_len=config.data.seq_len, compile_seconds=seconds, argument_gib=m.argument_size_in_bytes / 2**30,
      temp_gib=m.temp_size_in_bytes / 2**30, output_gib=m.output_size_in_bytes / 2**30,
      alias_gib=m.alias_size_in_bytes / 2**30, total_per_device_gib=total / 2**30,
      params=training.count_params(abstract.params))))
"""


def aot_compile_7b(devices: list[int], limit_s: int, overrides: str = "") -> dict:
  config = os.path.join(REPO, "configs", "janus_pro_7b.py")
  for n in devices:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
           "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    try:
      proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT.format(repo=REPO, config=config, overrides=overrides)],
                            env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
      print(f"N={n}: no compile within {limit_s} s", flush=True)
      continue
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"N={n}: failed after {time.perf_counter() - t0:.0f} s:\n{proc.stderr[-2000:]}", flush=True)
      continue
    return json.loads(lines[0][len("RESULT "):])
  return {}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--skip_aot", action="store_true")
  parser.add_argument("--skip_mfu", action="store_true")
  parser.add_argument("--aot_devices", default="256,128,64,32")
  parser.add_argument("--aot_limit_s", type=int, default=600)
  parser.add_argument("--aot_overrides", default="",
                      help="comma-separated config overrides, e.g. model.remat_policy=dots")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  results = {"mfu": measure_mfu()} if not args.skip_mfu else {"mfu": {}}
  print("| stage | step s | compile s | GFLOP/step | achieved GFLOP/s | matmul GFLOP/s | MFU vs matmul |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name, r in results["mfu"].items():
    print(f"| {name} | {r['step_seconds']:.3f} | {r['compile_seconds']:.1f} | {r['step_gflop']:.1f} | "
          f"{r['achieved_gflops']:.1f} | {r['matmul_gflops']:.1f} | {r['mfu_vs_matmul']:.1%} |")
  if not args.skip_aot:
    results["aot_7b_stage2"] = r = aot_compile_7b([int(x) for x in args.aot_devices.split(",")],
                                                   args.aot_limit_s, args.aot_overrides)
    if r:
      print(f"\nJanus-Pro-7B stage 2, {r['devices']} fake devices, mesh {r['mesh']}, batch {r['batch']} x "
            f"{r['seq_len']}: compiled in {r['compile_seconds']:.0f} s; per device "
            f"{r['total_per_device_gib']:.1f} GiB (arguments {r['argument_gib']:.1f}, temporaries "
            f"{r['temp_gib']:.1f}, outputs {r['output_gib']:.1f}, aliased {r['alias_gib']:.1f}); "
            f"{r['params'] / 1e9:.2f} B params")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
