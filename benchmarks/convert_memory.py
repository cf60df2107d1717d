"""Peak memory and time of `python -m janus_jax.convert` on a full-size random Janus-Pro-1B.

Writes a random checkpoint in the original deepseek-ai layout (bf16, every released key incl. the
unused attention pool and `codebook_used`), then converts it in a child process and reports the
child's peak RSS against the checkpoint's size on disk (the goal: below 1.5x).

  python benchmarks/convert_memory.py --workdir /tmp/janus_convert_bench [--format bin|safetensors]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
from test_model_shapes import reference_key_shapes  # noqa: E402  (the released key list)

from janus_jax import torch_io  # noqa: E402


def released_config() -> dict:
  siglip = {"image_size": 384, "model_name": "siglip_large_patch16_384", "select_feature": "same",
            "select_layer": -1}
  d = 2048
  return {
      "architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality",
      "language_config": {"hidden_size": d, "intermediate_size": 5632, "max_position_embeddings": 16384,
                          "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "num_key_value_heads": 16, "torch_dtype": "bfloat16", "vocab_size": 102400},
      "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": siglip},
      "aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 1024, "n_embed": d}},
      "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": 16384, "n_embed": 8}},
      "gen_aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 8, "n_embed": d}},
      "gen_head_config": {"cls": "vision_head",
                          "params": {"image_token_embed": d, "image_token_size": 16384, "n_embed": d}},
  }


def write_checkpoint(directory: str, fmt: str) -> int:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(released_config(), f)
  keys = reference_key_shapes(2048, 5632, 24)
  rng = np.random.default_rng(0)

  def tensor(shape):
    return (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)

  if fmt == "safetensors":
    lazy = {k: (lambda s=s, meta=False: (s, ml_dtypes.bfloat16) if meta else tensor(s)) for k, s in keys}
    torch_io.write_safetensors(os.path.join(directory, "model.safetensors"), lazy)
    return os.path.getsize(os.path.join(directory, "model.safetensors"))
  import torch  # the released Pro-1B file is a torch pickle

  state = {k: torch.from_numpy(tensor(s).view(np.uint16).astype(np.int16)).view(torch.bfloat16)
           for k, s in keys}
  torch.save(state, os.path.join(directory, "pytorch_model.bin"))
  del state
  return os.path.getsize(os.path.join(directory, "pytorch_model.bin"))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/janus_convert_bench")
  parser.add_argument("--format", choices=("bin", "safetensors"), default="bin")
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args()
  src, dst = os.path.join(args.workdir, "src"), os.path.join(args.workdir, "converted")
  shutil.rmtree(args.workdir, ignore_errors=True)
  t0 = time.time()
  size = write_checkpoint(src, args.format)
  print(f"wrote {args.format} checkpoint: {size / 1e9:.2f} GB in {time.time() - t0:.0f} s")
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "janus_jax.convert", src, dst, "--dtype", "bfloat16"],
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  seconds = time.time() - t0
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  result = {"format": args.format, "checkpoint_gb": size / 1e9, "peak_rss_gb": peak / 1e9,
            "peak_over_size": peak / size, "seconds": seconds, "returncode": proc.returncode}
  print("| format | checkpoint GB | peak RSS GB | peak / size | seconds |")
  print("| --- | --- | --- | --- | --- |")
  print(f"| {args.format} | {size / 1e9:.2f} | {peak / 1e9:.2f} | {peak / size:.2f} | {seconds:.0f} |")
  print(json.dumps(result))
  if not args.keep:
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
