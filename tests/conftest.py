import os
import sys

# 8 fake CPU devices for the sharding tests; must be set before jax initialises its backend.
# LLVM's optimisation level 0: the suite is mostly compiles of small programs, which take ~half
# the time (a tiny stage-3 train step: 5.7 s against 10.3; it then runs in 38 ms against 28).
# XLA's own HLO passes still run, so what is computed is the same (its loss equal to 1e-6).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
