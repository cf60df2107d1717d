"""The shortened digits demo end to end: `train.py --config=configs/digits.py:quick` (data,
tokenizer, stage 0, stages 1-3 through the real training code), then the evaluation, which must
score well above chance (10 %) on both tasks. About 6 minutes on the 2 CPU cores of earlier
hosts, 3.5-4.5 on a 2-core Sapphire Rapids; runs scored 58.5 %, 49.5 % and 53.5 %
(understanding, 200 held-out digits), 33 %, 38 % and 45 % (generation at CFG 5, 100 images), the
last with generation reading stored VQ ids (4:12 for the whole test). Caption classification (the
held-out digits labelled by the caption they are likeliest under, no sampling) read 55.0 %. With
the materialised-transpose weight gradients: 51.5 %, 38 % and 51.0 %, 4:37 for the test in a slow
hour of the host (stage-2 steps 240 ms against 275-296 ms without them, measured alongside). Half
the VQ steps and 300 stage-2 steps took 3:27 but read 31 % understanding: not kept. A one-token
understanding encoder (patch 32, so the LLM needs no position-specific readout) lifted
understanding to 80.5 % (70.5 % with a generation-heavy mixture, 74 % with 300 stage-2 steps) but
generation fell to 21 / 24 / 15 % against 38 % for the committed recipe on the same host: not
kept. VQ batches of 8 (40 s against 50 for the VQ) with the ViT's materialised gradients: 48.5 %,
40 % and 53.5 %, 3:54 for training in a slow hour of the host (4:03 before, the same hour).
On a 2-core AMD EPYC host (117 GFLOP/s matmuls): 49 %, 36 %, 48.5 %, training 4:11 (VQ 43 s,
stage 2 111 s, the three compiles 27 s), the test 4:39-5:05. Half the stage-2 compute reads near
or under the bounds: batch 8 for the same 450 steps 40 %, 18 %, 30.5 %; 225 steps at 5e-3 29.5 %,
21 %, 36 % (stages 1-3 from the same stage 0). So a 1-2 minute demo needs a faster step. A
2-layer LLM (the quick config now; 171 against 251 ms stage-2 steps): 53.5 %, 38 %, 67 % with
training in 3:46 and the test in 4:15; seed 1: 68.5 %, 36 %, 52.5 %, 3:38 / 4:06. (Generation
figures above: the PCA + SVM judge; the CNN judge, `digit_classifier`, replaced it, trained here
for 300 steps: 97.0 % on real held-out digits.) On a 2-core Intel Xeon host, training in 1:42:
52.0 %, 24 %, 46.5 % by that judge (24-30 % by four judges' draws, too near the bound); with 700
stage-2 steps instead of 450 (the quick config now), 2:05: 65.0 %, 51 %, 64.5 % (seed 1: 68.5 %,
55 %, 72.0 %); the test in 2:27."""

from __future__ import annotations

import os
import subprocess
import sys

from janus_jax import eval_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_demo_trains_above_chance(tmp_path):
  workdir = tmp_path / "digits"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
  subprocess.run([sys.executable, "train.py", "--config=configs/digits.py:quick",
                  f"--config.workdir={workdir}"], cwd=ROOT, env=env, check=True, timeout=900)
  for stage in ("stage1", "stage2", "stage3"):
    assert (workdir / stage / "model" / "config.json").is_file()
  results = eval_digits.evaluate(str(workdir / "model"), out_dir=str(tmp_path / "eval"),
                                 data_dir=str(workdir / "data"), run_dir=str(workdir),
                                 cfg_weights=(5.0,), images_per_digit=10, und_limit=200,
                                 classifier_steps=300)
  print(eval_digits.markdown_table(results))
  assert results["understanding"]["accuracy"] >= 0.4, results["understanding"]
  assert results["generation"]["cfg"]["5.0"]["accuracy"] >= 0.2, results["generation"]
  assert results["conditioning"]["accuracy"] >= 0.25, results["conditioning"]
