#!/usr/bin/env bash
# The GPU run of benchmarks/sampling.py (Janus-Pro-1B shapes, bfloat16) on a machine with no
# network whose Python already holds jax[cuda], torch, flax and numpy (Python 3.12) but not
# ml_collections, nor a transformers with the image-generation fix (>= 5.24; the image seen had
# 5.17, whose huggingface_hub is too old for 5.24+). Those travel as wheels in .whl/:
#
#   bash benchmarks/device_sampling.sh fetch     # here, with pip's network: wheels into .whl/
#   bash benchmarks/device_sampling.sh [OUTDIR]  # there: install .whl/ into /tmp/site, run
#
# Checked on CPU (2026-12-07) in a Python 3.12 venv made like that image (jax 0.11.2,
# transformers 5.17.0, huggingface_hub 1.33.0, no ml_collections) with this script's install.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "fetch" ]]; then
  # Pure-Python wheels, or cp312 manylinux ones, pinned to versions that import together.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    ml_collections==1.1.0 transformers==5.25.0 huggingface_hub==2.4.0 kernels==0.19.1 \
    httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 hf-xet==1.8.0 click==8.5.1 \
    tomlkit==0.15.3 idna==3.21 regex==2026.12.2
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  du -sh .whl
  exit 0
fi

out="${1:-${OUT:-/tmp/device_sampling}}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# jax and torch share the GPU: jax takes half up front instead of its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python3 - <<'EOF2'
import sys
import flax, jax, torch, transformers
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__, torch.cuda.is_available(),
      "| transformers", transformers.__version__, "| flax", flax.__version__)
if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (5, 24):
  sys.exit(f"transformers {transformers.__version__} lacks the image-generation fix (>= 5.24): run "
           "'bash benchmarks/device_sampling.sh fetch' where pip works and carry .whl")
import ml_collections  # noqa: F401  (janus_jax's configs; carried in .whl)
EOF2
# The layer scan is the jax default off CPU, so the separate jax_scan row would repeat it.
python3 benchmarks/sampling.py --preset pro1b --dtype bfloat16 --skip scan \
  --out "$out/gpu.json" "${@:2}" 2>&1 | tee "$out/gpu.log"
