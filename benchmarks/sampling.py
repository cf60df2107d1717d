"""Text-to-image token throughput: janus_jax vs `transformers` generate vs the reference eager loop.

One process measures, one after another (torch and XLA thread pools never share a timing window):
the machine's memory bandwidth and matmul rate, then janus_jax (jitted, warm), then torch
(2 threads): `generate(generation_mode="image")` and the README-style loop over the same modules.
The model (--preset): `bench`, the cpu-baseline.md benchmark config (the real vocab, codebook and
VQ-16 decoder, a 1024-wide 8-layer LLM), or `pro1b`, Janus-Pro-1B's generation path (2048 wide,
24 layers, MHA; the SigLIP encoder, unused by generation, is shrunk). Random weights
(transformers init), float32 or --dtype bfloat16 on both sides. torch runs on --device (CUDA when
present, synchronised before every clock read). The per-step floor is
max(bytes read / bandwidth, FLOPs / matmul rate), both measured in this run.

  python benchmarks/sampling.py --out /tmp/sampling.json                # full: 576 tokens, B 1 and 8
  python benchmarks/sampling.py --batches 1 --steps 32 --out /tmp/q.json  # quick
  python benchmarks/sampling.py --preset pro1b --dtype bfloat16 --out /tmp/gpu.json  # on a GPU
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from collections.abc import Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import JanusConfig, JanusForConditionalGeneration  # noqa: E402

from janus_jax import convert, sampling, token_loop  # noqa: E402
from janus_jax.models import janus as janus_lib  # noqa: E402

BOS, PAD, BOI = 100000, 100015, 100016
CFG, TEMPERATURE, PROMPT_LEN, TOKENS = 5.0, 1.0, 20, 576
# LLM (hidden, layers, heads, intermediate) per preset; vocab, codebook and VQ are the released ones.
PRESETS = {"bench": (1024, 8, 16, 2816), "pro1b": (2048, 24, 16, 5632)}


def hf_config(preset: str = "bench", layers: int | None = None) -> JanusConfig:
  hidden, depth, heads, mlp = PRESETS[preset]
  text = dict(model_type="llama", vocab_size=102400, hidden_size=hidden, intermediate_size=mlp,
              num_hidden_layers=layers or depth, num_attention_heads=heads,
              num_key_value_heads=heads, max_position_embeddings=16384, rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=False)
  vision = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=384,
                patch_size=16, projection_dim=hidden, depth=2, num_image_tokens=TOKENS)
  vq = dict(embed_dim=8, num_embeddings=16384, latent_channels=256, base_channels=128,
            channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, projection_dim=hidden,
            image_token_embed_dim=hidden, num_hidden_layers=2)
  return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=False)


class Timer:
  """Wall time plus the CPU time of other processes in the window (shared machines)."""

  def __enter__(self):
    self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_s(), _own_s()
    return self

  def __exit__(self, *exc):
    self.s = time.perf_counter() - self.t0
    self.foreign_cores = max(0.0, (_busy_s() - self.busy0) - (_own_s() - self.own0)) / self.s
    return False


def _busy_s() -> float:
  fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
  return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
  t = os.times()
  return t.user + t.system


def best_of(fn, repeats: int) -> tuple[float, float]:
  """(fastest seconds, foreign load in cores during that run)."""
  runs = []
  for _ in range(repeats):
    with Timer() as t:
      fn()
    runs.append((t.s, t.foreign_cores))
  return min(runs)


# --- machine ceilings -----------------------------------------------------------------------


def _matmul_size() -> int:
  return 2048 if jax.default_backend() == "cpu" else 8192


def jax_ceilings(dtype) -> dict:
  """Read and copy GB/s over 1 GiB (4 on accelerators); matmul GFLOP/s in the compute dtype."""
  x = jnp.ones(((256 if jax.default_backend() == "cpu" else 1024) << 20,), jnp.float32)
  total = jax.jit(jnp.sum)
  # Donated, so the copy writes into the same pages each time (no fresh-allocation page faults).
  copy = jax.jit(lambda v: v * 1.0001, donate_argnums=0)
  n = _matmul_size()
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  mm = jax.jit(lambda u: u @ u)
  buf = [copy(jnp.ones_like(x))]
  for f, arg in ((total, x), (mm, a)):
    jax.block_until_ready(f(arg))

  def copy_once():
    buf[0] = jax.block_until_ready(copy(buf[0]))

  read_s, _ = best_of(lambda: jax.block_until_ready(total(x)), 5)
  copy_s, _ = best_of(copy_once, 5)
  mm_s, _ = best_of(lambda: jax.block_until_ready(mm(a)), 5)
  return dict(read_gbs=x.nbytes / read_s / 1e9, copy_gbs=2 * x.nbytes / copy_s / 1e9,
              matmul_gflops=2 * n**3 / mm_s / 1e9)


def torch_ceilings(device: str, dtype) -> dict:
  x = torch.ones((256 if device == "cpu" else 1024) << 20, device=device)
  y = torch.empty_like(x)
  n = 2048 if device == "cpu" else 8192
  a = torch.randn(n, n, device=device, dtype=dtype)
  synced = lambda f: lambda: (f(), _sync(device))
  f = synced(lambda: x.sum())
  f()
  read_s, _ = best_of(f, 5)
  copy_s, _ = best_of(synced(lambda: y.copy_(x)), 5)
  f = synced(lambda: a @ a)
  f()
  mm_s, _ = best_of(f, 5)
  return dict(read_gbs=x.nbytes / read_s / 1e9, copy_gbs=2 * x.nbytes / copy_s / 1e9,
              matmul_gflops=2 * n**3 / mm_s / 1e9)


def _sync(device: str) -> None:
  if device != "cpu":
    torch.cuda.synchronize()


def step_floor(model, params, rows: int, steps: int, bw_gbs: float, gflops: float) -> dict:
  """Per-step lower bound: weights (trunk, image head, gen aligner) + KV at the mean context."""
  flat = flax.traverse_util.flatten_dict(params)
  per_step = sum(v.size for k, v in flat.items()
                 if k[0] in ("image_head", "generation_aligner") or k[:2] == ("llm", "decoder"))
  c = model.config.llm
  param_bytes = jnp.dtype(model.config.param_dtype).itemsize
  kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(model.config.dtype).itemsize
  ctx = PROMPT_LEN + steps / 2
  nbytes = per_step * param_bytes + rows * ctx * kv_per_token
  flops = 2 * per_step * rows + 4 * rows * c.num_layers * ctx * c.num_heads * c.head_dim
  bw_ms, flop_ms = nbytes / bw_gbs / 1e6, flops / gflops / 1e6
  return dict(weights_mb=per_step * param_bytes / 1e6, bytes_mb=nbytes / 1e6, gflop=flops / 1e9,
              bw_ms=bw_ms, flop_ms=flop_ms, floor_ms=max(bw_ms, flop_ms))


# --- the three samplers ---------------------------------------------------------------------


def prompts(batch: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 100000, (batch, PROMPT_LEN))
  ids[:, 0], ids[:, -1] = BOS, BOI
  return ids, np.ones(ids.shape, bool)


def bench_jax(model, params, batch: int, steps: int, repeats: int, vq: bool = True,
              unroll: bool = True, segments: int | None = None) -> dict:
  """unroll: decode over per-layer weights (the CPU default) or the layer scan. segments: the
  token loop cut into scans over growing KV-cache prefixes (sampling.generate_image_tokens;
  None: the library's default, sampling.default_segments)."""
  ids, valid = prompts(batch)
  settings = sampling.Sampler(temperature=TEMPERATURE)
  run = lambda seed: jax.block_until_ready(sampling.generate_image_tokens(
      model, params, ids, valid, rng=jax.random.key(seed), pad_id=PAD, cfg_weight=CFG,
      settings=settings, num_image_tokens=steps, unroll_layers=unroll, segments=segments))
  # The two jitted functions on the rows generate_image_tokens builds, compiled ahead of time.
  length = token_loop.bucket_length(PROMPT_LEN)
  pad = [(0, 0), (length - PROMPT_LEN, 0)]
  rows, rows_valid = sampling.cfg_rows(np.pad(ids, pad), np.pad(valid, pad), PAD)
  rows, rows_valid = jnp.asarray(rows, jnp.int32), jnp.asarray(rows_valid)
  segments = segments or sampling.default_segments(model, params, 2 * batch, length + steps)
  prefill = lambda p, r, v: sampling._image_prefill(model, p, r, v, mesh=None)
  with Timer() as compile_t:
    prefill_exe = jax.jit(prefill).lower(params, rows, rows_valid).compile()
    hidden, cache = jax.eval_shape(prefill, params, rows, rows_valid)
    sampling._image_decode.lower(model, params, hidden, cache, rows_valid, jax.random.key(0),
                                 jnp.float32(CFG), num_tokens=steps, settings=settings, mesh=None,
                                 unroll=unroll, segments=segments).compile()
  run(0)  # warm: the jit caches of generate_image_tokens
  total_s, foreign = best_of(lambda: run(1), repeats)
  prefill_s, _ = best_of(lambda: jax.block_until_ready(prefill_exe(params, rows, rows_valid)), 3)
  out = dict(total_s=total_s, prefill_ms=prefill_s * 1e3, compile_s=compile_t.s, vq_s=float("nan"),
             foreign_cores=foreign, segments=segments)
  if not vq:
    return out
  # The VQ decode needs the full 24 x 24 grid: real tokens when all 576 were generated.
  vq_ids = run(2) if steps == TOKENS else np.zeros((batch, TOKENS), np.int32)
  decode = lambda: jax.block_until_ready(sampling.decode_images(model, params, vq_ids))
  with Timer() as vq_cold:
    decode()
  vq_s, _ = best_of(decode, 1)
  return dict(out, vq_s=vq_s, vq_compile_s=vq_cold.s - vq_s)


def bench_hf(hf, batch: int, steps: int, repeats: int) -> dict:
  ids, valid = prompts(batch)
  device = hf.device
  ids_t = torch.from_numpy(ids).to(device)
  valid_t = torch.from_numpy(valid.astype(np.int64)).to(device)
  run = lambda: (hf.generate(ids_t, attention_mask=valid_t, generation_mode="image", do_sample=True,
                             guidance_scale=CFG, temperature=TEMPERATURE, top_k=0),
                 _sync(device.type))
  with torch.no_grad():
    hf.model.vision_model.config.num_image_tokens = min(steps, 8)
    run()  # warm-up (no compilation in eager torch; a short run suffices)
    hf.model.vision_model.config.num_image_tokens = steps
    total_s, foreign = best_of(run, repeats)
  hf.model.vision_model.config.num_image_tokens = TOKENS
  return dict(total_s=total_s, foreign_cores=foreign)


def eager_loop(hf, ids: np.ndarray, steps: int) -> torch.Tensor:
  """The reference's generation loop (README / generation_inference.py) over transformers modules."""
  device = hf.device
  tokens = torch.from_numpy(np.repeat(ids, 2, axis=0)).to(device)
  tokens[1::2, 1:-1] = PAD  # interleaved unconditional rows keep BOS and BOI
  embeds = hf.get_input_embeddings()(tokens)
  generated = torch.zeros((ids.shape[0], steps), dtype=torch.long, device=device)
  cache = None
  # The cache keyword was renamed from past_key_values in transformers 5.x.
  cache_kw = ("cache" if "cache" in inspect.signature(hf.model.language_model.forward).parameters
              else "past_key_values")
  for i in range(steps):
    out = hf.model.language_model(inputs_embeds=embeds, use_cache=True, **{cache_kw: cache})
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    logits = hf.model.generation_head(out.last_hidden_state[:, -1, :])
    cond, uncond = logits[0::2], logits[1::2]
    probs = torch.softmax((uncond + CFG * (cond - uncond)) / TEMPERATURE, dim=-1)
    next_token = torch.multinomial(probs, num_samples=1)
    generated[:, i] = next_token.squeeze(-1)
    embeds = hf.prepare_embeddings_for_image_generation(
        torch.cat([next_token, next_token], dim=1).view(-1)).unsqueeze(1)
  _sync(device.type)
  return generated


def bench_eager(hf, batch: int, steps: int, repeats: int) -> dict:
  ids, _ = prompts(batch)
  with torch.no_grad():
    eager_loop(hf, ids, min(steps, 8))
    total_s, foreign = best_of(lambda: eager_loop(hf, ids, steps), repeats)
  return dict(total_s=total_s, foreign_cores=foreign)


def bench_torch_vq(hf) -> float:
  ids = torch.zeros((1, TOKENS), dtype=torch.long, device=hf.device)
  run = lambda: (hf.decode_image_tokens(ids), _sync(hf.device.type))
  with torch.no_grad():
    run()
    return best_of(run, 1)[0]


# --- report ---------------------------------------------------------------------------------


def summarise(r: dict, batch: int, steps: int) -> dict:
  ms_step = r["total_s"] / steps * 1e3
  # Images/s of tokens for a full 576-token image (extrapolated when fewer steps were timed).
  image_s = r["total_s"] * TOKENS / steps
  return dict(r, ms_per_step=ms_step, tokens_per_s=batch * steps / r["total_s"],
              images_per_s=batch / image_s, seconds_per_576=image_s)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="bench", choices=sorted(PRESETS), help="LLM shapes")
  p.add_argument("--layers", type=int, default=None, help="override the preset's LLM depth")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="weights, activations and KV cache on both sides (sampling math stays float32)")
  p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                 help="torch device for the transformers paths")
  p.add_argument("--batches", default="1,8", help="images per run, comma separated")
  p.add_argument("--steps", type=int, default=TOKENS, help="image tokens timed per run (<= 576)")
  p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (best kept)")
  p.add_argument("--skip", default="", help="comma list of: hf, eager, vq (both VQ decodes), "
                 "scan (jax with the layer scan instead of unrolled layers)")
  p.add_argument("--segments", type=int, default=0, help="also time jax with the token loop cut "
                 "into exactly this many scans over growing KV-cache prefixes (the 'jax_segmented' "
                 "row; 1: one scan). The 'jax' row uses sampling.default_segments")
  p.add_argument("--out", default=None, help="write the results as JSON here (after every measurement)")
  args = p.parse_args()
  batches = [int(b) for b in args.batches.split(",")]
  skip = set(filter(None, args.skip.split(",")))
  if args.device == "cpu":
    torch.set_num_threads(2)
  torch.manual_seed(0)
  torch_dtype = getattr(torch, args.dtype)

  t0 = time.perf_counter()
  with torch.device(args.device):
    hf = JanusForConditionalGeneration(hf_config(args.preset, args.layers)).to(torch_dtype).eval()
  hf.generation_config.bos_token_id, hf.generation_config.pad_token_id = BOS, PAD
  hf.generation_config.generation_kwargs = {"boi_token_id": BOI}
  config = convert.config_from_hf(hf.config.to_dict())
  config.dtype = config.param_dtype = args.dtype
  model = janus_lib.build(config)
  state = hf.state_dict()
  params = convert.params_from_hf_state_dict(_AsNumpy(state), model,
                                             place=lambda path, x: jax.device_put(x))
  del state
  print(f"built + converted in {time.perf_counter() - t0:.1f} s", flush=True)

  results = dict(config=dict(preset=args.preset, layers=config.llm.num_layers, dtype=args.dtype,
                             prompt_len=PROMPT_LEN, steps=args.steps, cfg=CFG, temperature=TEMPERATURE,
                             jax=jax.__version__, torch=torch.__version__, devices=str(jax.devices()),
                             torch_device=str(hf.device)),
                 ceilings=dict(jax=jax_ceilings(jnp.dtype(args.dtype))), jax={}, jax_scan={},
                 jax_segmented={}, hf={},
                 eager={}, floor={}, errors={})
  print("jax ceilings", results["ceilings"]["jax"], flush=True)

  def measure(name: str, b: int, fn) -> None:
    """One measurement; a failure is recorded and the run goes on (one report per run)."""
    try:
      results[name][b] = summarise(fn(), b, args.steps)
      print(f"{name} B={b}", results[name][b], flush=True)
    except Exception as e:  # noqa: BLE001 -- reported in the table and the JSON
      results["errors"][f"{name} B={b}"] = f"{type(e).__name__}: {e}"
      print(f"{name} B={b} FAILED: {type(e).__name__}: {e}", flush=True)
    save(results, args.out)

  for b in batches:
    measure("jax", b, lambda: bench_jax(model, params, b, args.steps, args.repeats, "vq" not in skip))
    if "scan" not in skip:
      measure("jax_scan", b, lambda: bench_jax(model, params, b, args.steps, args.repeats, False,
                                               unroll=False))
    if args.segments > 0:
      measure("jax_segmented", b, lambda: bench_jax(model, params, b, args.steps, args.repeats,
                                                    False, segments=args.segments))
  time.sleep(1.0)  # let XLA's worker threads go idle before torch's OpenMP pool spins up
  results["ceilings"]["torch"] = torch_ceilings(args.device, torch_dtype)
  print("torch ceilings", results["ceilings"]["torch"], flush=True)
  for b in batches:
    if "hf" not in skip:
      measure("hf", b, lambda: bench_hf(hf, b, args.steps, args.repeats))
    if "eager" not in skip:
      measure("eager", b, lambda: bench_eager(hf, b, args.steps, args.repeats))
  if "vq" not in skip:
    try:
      results["torch_vq_s_per_image"] = bench_torch_vq(hf)
    except Exception as e:  # noqa: BLE001
      results["errors"]["torch VQ"] = f"{type(e).__name__}: {e}"

  ceil = results["ceilings"]
  bw = max(ceil["jax"]["read_gbs"], ceil["torch"]["read_gbs"])
  rate = max(ceil["jax"]["matmul_gflops"], ceil["torch"]["matmul_gflops"])
  for b in batches:
    results["floor"][b] = step_floor(model, params, 2 * b, args.steps, bw, rate)
  save(results, args.out)
  print_table(results, batches)


class _AsNumpy(Mapping):
  """A torch state dict read as float32 numpy, one tensor at a time (bfloat16 has no numpy)."""

  def __init__(self, state: Mapping[str, torch.Tensor]):
    self.state = state

  def __getitem__(self, key: str) -> np.ndarray:
    return self.state[key].detach().float().cpu().numpy()

  def __iter__(self):
    return iter(self.state)

  def __len__(self) -> int:
    return len(self.state)


def save(results: dict, path: str | None) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(results, f, indent=1, default=str)


def print_table(results: dict, batches: list[int]) -> None:
  c = results["ceilings"]
  print(f"\nceilings: read {c['jax']['read_gbs']:.0f} (jax) / {c['torch']['read_gbs']:.0f} (torch) GB/s, "
        f"copy {c['jax']['copy_gbs']:.0f} / {c['torch']['copy_gbs']:.0f} GB/s r+w, "
        f"matmul {c['jax']['matmul_gflops']:.0f} / {c['torch']['matmul_gflops']:.0f} GFLOP/s; "
        f"steps timed {results['config']['steps']}; {results['config']['preset']} "
        f"({results['config']['layers']} layers), {results['config']['dtype']}")
  head = ("| path | B (rows) | ms/step | floor ms | x floor | tokens/s | images/s (tokens) | "
          "prefill ms | compile s | VQ s/img | foreign cores |")
  print(head)
  print("|" + "---|" * (head.count("|") - 1))
  for b in batches:
    fl = results["floor"][b]
    for name in ("jax", "jax_scan", "jax_segmented", "hf", "eager"):
      r = results.get(name, {}).get(b)
      if not r:
        continue
      extra = (f"{r['prefill_ms']:.1f} | {r['compile_s']:.1f} | {r['vq_s'] / b:.3f}"
               if name.startswith("jax") else "- | - | -")
      label = f"{name} (scans {r['segments']})" if "segments" in r else name
      print(f"| {label} | {b} ({2 * b}) | {r['ms_per_step']:.2f} | {fl['floor_ms']:.2f} | "
            f"{r['ms_per_step'] / fl['floor_ms']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['images_per_s']:.4f} | {extra} | {r['foreign_cores']:.2f} |")
  print("\n| B | floor (bytes MB / GFLOP) | HF / jax | eager / jax | HF / jax_scan | jax / floor |")
  print("|---|---|---|---|---|---|")
  ms = lambda n, b: results[n][b]["ms_per_step"] if b in results[n] else float("nan")
  for b in batches:
    fl = results["floor"][b]
    print(f"| {b} | {fl['floor_ms']:.2f} ms ({fl['bytes_mb']:.0f} / {fl['gflop']:.2f}) | "
          f"{ms('hf', b) / ms('jax', b):.2f} | {ms('eager', b) / ms('jax', b):.2f} | "
          f"{ms('hf', b) / ms('jax_scan', b):.2f} | {ms('jax', b) / fl['floor_ms']:.2f} |")
  if "torch_vq_s_per_image" in results:
    print(f"\nVQ decode (576 ids -> 384x384): torch {results['torch_vq_s_per_image']:.3f} s/img; jax "
          + ", ".join(f"B={b} {results['jax'][b]['vq_s'] / b:.3f} s/img" for b in batches
                      if b in results["jax"]))
  for what, err in results["errors"].items():
    print(f"FAILED {what}: {err}")


if __name__ == "__main__":
  main()
