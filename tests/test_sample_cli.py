"""sample.py end to end on a tiny converted checkpoint with its tokenizer (subprocess, as a user runs it)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import oracle
import torch
from janus_jax import convert, load_pretrained
from test_tokenizer import build_hf_json

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_sample_cli_generates_images_and_answers(tmp_path):
  from transformers import JanusForConditionalGeneration

  config = oracle.hf_config("gqa")
  config.text_config.vocab_size = 512  # room for the test tokenizer's 500 ids
  hf = JanusForConditionalGeneration(config).eval()
  oracle.randomise_(hf, 0)
  src = tmp_path / "hf"
  hf.save_pretrained(src)
  build_hf_json(src)
  ckpt = tmp_path / "converted"
  assert convert.main([str(src), str(ckpt), "--dtype", "float32"]) == 0
  digit = tmp_path / "digit.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), np.uint8)).save(digit)
  out = tmp_path / "samples[1]"  # glob characters: the earlier-run check must not read them
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, str(REPO / "sample.py"), f"--checkpoint={ckpt}", "--prompt=a red cube",
       "--prompt=a cat", "--num_images=2", "--cfg=3", "--seed=1", f"--out={out}",
       f"--image={digit}", "--question=What digit is this?", "--config.max_new_tokens=5"],
      capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(os.listdir(out))
  assert names == ["grid.png", "prompt0_0.png", "prompt0_1.png", "prompt1_0.png", "prompt1_1.png",
                   "samples.json"]
  record = json.loads((out / "samples.json").read_text())
  assert record["images"]["prompt1_0.png"] == "a cat" and record["seed"] == 1
  assert record["cfg_weight"] == 3 and record["temperature"] == 1.0
  assert np.asarray(Image.open(out / "prompt1_0.png")).shape == (8, 8, 3)  # 4x4 tokens, VQ x2
  assert np.asarray(Image.open(out / "grid.png")).shape == (16, 16, 3)
  assert "compile" in proc.stderr and "run" in proc.stderr
  assert "wrote 4 image(s)" in proc.stdout
  # The answer is the oracle's greedy answer: transformers' generate on the same prompt and pixels.
  loaded = load_pretrained(str(ckpt))
  batch = loaded.processor.understanding_batch(["What digit is this?"], [[Image.open(digit)]])
  hf.config.image_token_id = loaded.tokenizer.image_placeholder_id
  eos = loaded.tokenizer.eos_id
  with torch.no_grad():
    hf_ids = hf.generate(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                         attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                         pixel_values=torch.from_numpy(batch["pixels"][:, 0]).permute(0, 3, 1, 2),
                         max_new_tokens=5, do_sample=False, pad_token_id=eos, eos_token_id=eos)
  hf_answer = loaded.tokenizer.decode(hf_ids[0, batch["input_ids"].shape[1]:].tolist()).strip()
  assert hf_answer and hf_answer in proc.stdout.splitlines(), (hf_answer, proc.stdout)
  # A limit past the context (the default 512 against this model's 512) caps the answer at the
  # room the prompt leaves; a prompt too long for the context is refused naming its flag.
  ask = [sys.executable, str(REPO / "sample.py"), f"--checkpoint={ckpt}", f"--image={digit}",
         "--question=What digit is this?"]
  proc = subprocess.run(ask, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  room = 512 - batch["input_ids"].shape[1]
  assert f"--config.max_new_tokens=512 capped at {room}" in proc.stderr
  assert proc.stdout.strip().startswith(hf_answer), (hf_answer, proc.stdout)
  long_prompt = " ".join(["cube"] * 600)
  for flags, message in (([f"--question={long_prompt}"], "--question: the prompt is"),
                         ([f"--prompt={long_prompt}", f"--out={tmp_path}/long"],
                          "--prompt: the longest prompt is")):
    proc = subprocess.run(ask[:3] + flags if "--prompt" in flags[0] else ask[:4] + flags,
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
  # A second run into the same --out: refused before loading; with --overwrite, the earlier
  # run's files go, so the folder holds one run only.
  second = [sys.executable, str(REPO / "sample.py"), f"--checkpoint={ckpt}", "--prompt=a dog",
            "--num_images=1", f"--out={out}", "--temperature=0"]
  proc = subprocess.run(second, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
  assert proc.returncode != 0 and "holds an earlier run's outputs" in proc.stderr
  assert "loading" not in proc.stderr
  (out / "prompt_ideas.png").write_text("the user's file, not a sample")
  proc = subprocess.run(second + ["--overwrite"], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # (and the staging folder the new files were written into first is gone)
  assert sorted(os.listdir(out)) == ["grid.png", "prompt0_0.png", "prompt_ideas.png", "samples.json"]
  assert json.loads((out / "samples.json").read_text())["prompts"] == ["a dog"]


def test_sample_cli_explains_a_missing_checkpoint(tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--checkpoint={tmp_path}/none",
                         "--prompt=x"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                        env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode != 0 and "python train.py" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--prompt=x", "--num_images=0"], "--num_images=0: need at least 1"),
    (["--question=What digit is this?"], "--question needs --image"),
    (["--image=missing.png", "--question=q"], "--image 'missing.png': no such file"),
    (["--image=notes.png", "--question=q"], "--image 'notes.png': not a readable image"),
    (["--prompt=x", "--top_p=0"], "need temperature >= 0, top_k >= 0, 0 < top_p <= 1"),
    (["--prompt=x", "--cfg=nan"], "--cfg=nan: the guidance weight must be finite"),
    (["--prompt=x", "--seed=4294967296"], "--seed=4294967296: must be in [0, 2**32)"),
    (["--prompt=x", "--config.dtype=bf16"], "--config.dtype='bf16': expected"),
    (["--image=notes.png", "--question=q", "--config.answer_temperature=-1"],
     "--config.answer_temperature=-1"),
    (["--prompt=x", "--out=notes.png"], "--out=notes.png: exists and is not a directory"),
    (["--prompt=x", "--out=notes.png/sub"],  # (failed only after sampling, at the first write)
     "--out=notes.png/sub: cannot be created or written"),
    (["--image=cut.jpg", "--question=q"], "--image 'cut.jpg': not a readable image"),
    (["--image=whole.jpg", "--question=<image_placeholder> what?"],
     "--question contains <image_placeholder>"),
])
def test_sample_cli_names_the_bad_flag_before_loading(tmp_path, flags, message):
  (tmp_path / "notes.png").write_text("not an image")
  jpeg = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(jpeg, "JPEG")
  (tmp_path / "whole.jpg").write_bytes(jpeg.getvalue())
  # Half a JPEG passes Image.verify (it does not decode): the check must decode the pixels.
  (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
  proc = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--checkpoint={tmp_path}/none",
                         *flags], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                        env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
