"""Scores a model trained by `python train.py` (the digits demo): understanding accuracy, GenEval-
style generation accuracy per CFG weight, sample grids and the loss curves.

  python benchmarks/digits_eval.py                       # runs/digits/model -> runs/digits/eval
  python benchmarks/digits_eval.py --checkpoint runs/digits/model --cfg 1 3 5 --per_digit 10

Writes OUT/results.json, OUT/samples_cfg{w}.png, OUT/losses.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from janus_jax import eval_digits  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--checkpoint", default="runs/digits/model", help="a load_pretrained directory")
  p.add_argument("--data_dir", default="runs/digits/data",
                 help="digits.prepare's data_dir (its manifest fixes the split); optional")
  p.add_argument("--run_dir", default="runs/digits", help="searched for metrics.jsonl files")
  p.add_argument("--out", default="runs/digits/eval")
  p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0, 5.0], help="CFG weights")
  p.add_argument("--per_digit", type=int, default=10, help="generated images per digit")
  p.add_argument("--und_limit", type=int, default=0, help="score only N test images (0: all)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0, help="the sampling and the judge's seed")
  p.add_argument("--split_seed", type=int, default=0,
                 help="digits.prepare's seed (the held-out split), used only when --data_dir has "
                      "no digits_prepare.json")
  p.add_argument("--classifier_steps", type=int, default=1500,
                 help="training steps of the judge (janus_jax/digit_classifier.py)")
  p.add_argument("--system_prompt", default=None,
                 help="the system prompt training used (default: processing.SYSTEM_PROMPT)")
  args = p.parse_args(argv)
  results = eval_digits.evaluate(
      args.checkpoint, out_dir=args.out,
      data_dir=args.data_dir if os.path.isdir(args.data_dir) else None,
      run_dir=args.run_dir if os.path.isdir(args.run_dir) else None, seed=args.seed,
      split_seed=args.split_seed, cfg_weights=args.cfg, images_per_digit=args.per_digit,
      und_limit=args.und_limit or None,
      system_prompt=args.system_prompt, temperature=args.temperature, top_k=args.top_k,
      classifier_steps=args.classifier_steps)
  print(eval_digits.markdown_table(results))
  print(f"\nunderstanding examples (label, answer): {json.dumps(results['understanding']['examples'])}")
  print(f"wrote {', '.join(results['files'] + ['results.json'])} to {args.out} "
        f"in {results['seconds']:.0f} s")
  return results


if __name__ == "__main__":
  main()
