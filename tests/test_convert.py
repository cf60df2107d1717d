"""The checkpoint converter: both released formats in, `transformers` format out, errors."""

from __future__ import annotations

import copy
import functools
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import checkpoints
from janus_jax import convert, pretrained, torch_io
from janus_jax.models import janus as janus_lib
from janus_jax.models import llm
from test_model_shapes import load_config

IMAGE_TOKEN = 5


@functools.lru_cache(maxsize=None)
def _oracle():
  return checkpoints.build_oracle("gqa", seed=3)


@pytest.fixture(scope="module")
def hf_model():
  return _oracle()


def _reference_outputs(hf, ids, valid, pixels):
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
             attention_mask=torch.from_numpy(valid.astype(np.int64)),
             position_ids=torch.from_numpy(positions))
    hf.model.vqmodel.quantize.quant_state_dims = [4, 4]
    decoded = hf.model.vqmodel.decode(torch.from_numpy(ids[:, :16] % 64)).numpy().transpose(0, 2, 3, 1)
  return out.logits.numpy(), decoded


def _assert_matches_oracle(loaded: pretrained.Pretrained, hf):
  rng = np.random.default_rng(0)
  ids = rng.integers(10, 256, (2, 24))
  ids[:, 4:20] = IMAGE_TOKEN
  valid = np.ones(ids.shape, bool)
  valid[1, :2] = False
  pixels = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)

  def run(m):
    x = m.embed_inputs(ids, ids == IMAGE_TOKEN, pixels[:, None])
    v = jnp.asarray(valid)
    hidden, _ = m(x, llm.positions_from_mask(v), llm.causal_mask(v))
    return m.text_logits(hidden), m.vq_decode(ids[:, :16] % 64)

  logits, decoded = jax.jit(lambda p: loaded.model.apply({"params": p}, method=run))(loaded.params)
  ref_logits, ref_decoded = _reference_outputs(hf, ids, valid, pixels)
  np.testing.assert_allclose(np.asarray(logits)[valid], ref_logits[valid], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(decoded, ref_decoded, atol=1e-4)


@pytest.mark.parametrize("layout", ["original-safetensors", "original-bin", "original-bin_shards", "hf"])
def test_convert_each_layout_reproduces_the_oracle(tmp_path, hf_model, layout):
  src = str(tmp_path / "src")
  if layout == "hf":
    checkpoints.write_hf(src, hf_model)
  else:
    checkpoints.write_original(src, hf_model, layout.split("-")[1])
  dst = str(tmp_path / "converted")
  assert convert.main([src, dst, "--dtype", "float32"]) == 0
  assert sorted(os.listdir(tmp_path)) == ["converted", "src"]  # no temporary left behind
  loaded = pretrained.load_pretrained(dst, with_tokenizer=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loaded.params))
  _assert_matches_oracle(loaded, hf_model)


def test_load_pretrained_converts_pytorch_directories_on_the_fly(tmp_path, hf_model):
  src = checkpoints.write_original(str(tmp_path / "src"), hf_model, "bin")
  loaded = pretrained.load_pretrained(src, dtype="float32", with_tokenizer=False)
  _assert_matches_oracle(loaded, hf_model)
  assert sorted(os.listdir(src)) == ["config.json", "pytorch_model.bin"]  # nothing written


def test_bfloat16_conversion_and_mesh_placement(tmp_path, hf_model):
  src = checkpoints.write_hf(str(tmp_path / "src"), hf_model)
  dst = str(tmp_path / "bf16")
  assert convert.main([src, dst]) == 0
  from janus_jax import sharding
  mesh = sharding.make_mesh((2, 2, 2))
  loaded = pretrained.load_pretrained(dst, mesh=mesh, with_tokenizer=False)
  kernel = loaded.params["llm"]["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.dtype == jnp.bfloat16 and kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  ref = hf_model.state_dict()["model.language_model.layers.1.mlp.gate_proj.weight"]
  np.testing.assert_array_equal(np.asarray(kernel[1]).astype(np.float32),
                                ref.to(torch.bfloat16).float().numpy().T)


def test_original_to_jax_to_transformers_is_bit_exact(tmp_path, hf_model):
  from transformers import JanusForConditionalGeneration

  src = checkpoints.write_original(str(tmp_path / "src"), hf_model, "safetensors")
  jax_dir, out = str(tmp_path / "jax"), str(tmp_path / "exported")
  assert convert.main([src, jax_dir, "--dtype", "float32"]) == 0
  assert convert.main([jax_dir, out, "--to-pytorch"]) == 0
  reloaded, info = JanusForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not reloaded.config.tie_word_embeddings
  ref = hf_model.state_dict()
  got = reloaded.state_dict()
  assert set(got) == set(ref)
  for key in ref:
    assert torch.equal(got[key], ref[key]), key
  # --dtype casts the export; --family belongs to the import.
  out16 = str(tmp_path / "exported16")
  assert convert.main([jax_dir, out16, "--to-pytorch", "--dtype", "bfloat16"]) == 0
  from safetensors.torch import load_file
  half = load_file(os.path.join(out16, "model.safetensors"))
  assert set(half) == set(ref) and all(t.dtype == torch.bfloat16 for t in half.values())
  assert torch.equal(half["lm_head.weight"], ref["lm_head.weight"].to(torch.bfloat16))
  with pytest.raises(SystemExit):
    convert.main([jax_dir, str(tmp_path / "x"), "--to-pytorch", "--family", "janus"])


def _expect_failure(tmp_path, src, match):
  dst = str(tmp_path / "dst")
  with pytest.raises((KeyError, ValueError, torch_io.UnsafeCheckpointError), match=match):
    convert.convert_checkpoint(src, dst, "float32")
  assert not os.path.exists(dst)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".dst")]
  assert convert.main([src, dst]) == 1  # the CLI reports it too


def _original_state(hf_model):
  return {k: v.contiguous() for k, v in checkpoints.hf_to_original(hf_model.state_dict()).items()}


def _write_state(tmp_path, hf_model, state):
  from safetensors.torch import save_file

  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(checkpoints.original_config(hf_model.config)))
  save_file(state, str(src / "model.safetensors"))
  return str(src)


def test_missing_tensor_names_the_key(tmp_path, hf_model):
  state = _original_state(hf_model)
  del state["gen_head.vision_head.bias"]
  _expect_failure(tmp_path, _write_state(tmp_path, hf_model, state),
                  r"missing tensor 'gen_head.vision_head.bias' \(original format\), read as "
                  "'model.generation_head.vision_head.bias'")


def test_every_transformers_key_names_its_original_key(hf_model):
  """A missing tensor is named by the key the original checkpoint would hold (its inverse)."""
  from janus_jax import original_format

  original = _original_state(hf_model)
  for hf in hf_model.state_dict():
    if not original_format.IGNORED_KEYS.search(hf):
      assert original_format.hf_to_original_key(hf) in original, hf


def test_unexpected_tensor_is_reported(tmp_path, hf_model, capsys):
  state = _original_state(hf_model)
  state["language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
  _expect_failure(tmp_path, _write_state(tmp_path, hf_model, state), "unexpected tensors.*layers.7")
  assert capsys.readouterr().err.startswith(f"error: {tmp_path}")  # not a quoted KeyError


def test_a_tensor_that_is_not_floating_point_is_refused(tmp_path, hf_model):
  state = _original_state(hf_model)
  state["gen_embed.weight"] = torch.zeros(64, 8, dtype=torch.int32)  # right shape, wrong kind
  _expect_failure(tmp_path, _write_state(tmp_path, hf_model, state),
                  r"'gen_embed.weight' .* has dtype int32, expected a float type")


@pytest.mark.parametrize("entry", [{"data_offsets": ["0", "4"]}, {"data_offsets": 4},
                                   {"shape": "4"}, {"shape": [-1]}, {"dtype": 7},
                                   {"data_offsets": [4, 0]}])
def test_a_corrupt_safetensors_header_entry_is_named(tmp_path, hf_model, entry):
  import struct

  src = _write_state(tmp_path, hf_model, _original_state(hf_model))
  path = os.path.join(src, "model.safetensors")
  header = {"vq.quantize.embedding.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4],
                                             **entry}}
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
  _expect_failure(tmp_path, src, r"model.safetensors: corrupt safetensors header entry for "
                                 r"'vq.quantize.embedding.weight'")


def test_a_state_dict_of_parameters_reads_as_its_tensors(tmp_path):
  """torch.save(model.state_dict(keep_vars=True)) pickles nn.Parameters."""
  state = {"w": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.randn(4)}
  torch.save(state, tmp_path / "p.bin")
  got = torch_io.load_torch_pickle(str(tmp_path / "p.bin"))
  for key, value in state.items():
    np.testing.assert_array_equal(got[key].load(), value.detach().numpy())


def test_shape_mismatch_names_key_expected_and_found(tmp_path, hf_model):
  state = _original_state(hf_model)
  state["gen_embed.weight"] = torch.zeros(64, 9)
  _expect_failure(tmp_path, _write_state(tmp_path, hf_model, state),
                  r"'gen_embed.weight' \(in [\w.-]+\), read as 'model.generation_embeddings.weight' "
                  r"has shape \(64, 9\), expected \(64, 8\)")  # the original key and its file


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_bad_keys_and_shapes_fail_before_any_tensor_is_read(tmp_path, hf_model, monkeypatch,
                                                            layout):
  """From the headers alone: on a 7B, reading the tensors first took minutes."""
  from safetensors.torch import save_file

  if layout == "hf":
    src = checkpoints.write_hf(str(tmp_path / "src"), hf_model)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    head = "lm_head.weight"
  else:
    state = _original_state(hf_model)
    src = _write_state(tmp_path, hf_model, state)
    head = "language_model.lm_head.weight"
  reads = []
  real_read = torch_io.SafetensorsFile.__getitem__
  monkeypatch.setattr(torch_io.SafetensorsFile, "__getitem__",
                      lambda self, key: reads.append(key) or real_read(self, key))
  for change, match in [({head: torch.zeros(3, 3)}, "has shape \\(3, 3\\)"),
                        ({"extra.weight": torch.zeros(2)}, "unexpected tensors"),
                        ({head: torch.zeros(state[head].shape, dtype=torch.int16)}, "dtype int16")]:
    save_file({**state, **change}, os.path.join(src, "model.safetensors"))
    with pytest.raises((KeyError, ValueError), match=match):
      convert.convert_directory(src, "float32")
    assert reads == [], (change, len(reads))


def test_unknown_schema(tmp_path, hf_model):
  src = checkpoints.write_original(str(tmp_path / "src"), hf_model, "safetensors")
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump({"model_type": "something_else"}, f)
  _expect_failure(tmp_path, src, "unknown config schema")


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_truncated_file(tmp_path, hf_model, layout):
  src = checkpoints.write_original(str(tmp_path / "src"), hf_model, layout)
  path = os.path.join(src, "model.safetensors" if layout == "safetensors" else "pytorch_model.bin")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  _expect_failure(tmp_path, src, "truncated|corrupt")


def test_pickle_that_would_run_code_is_refused(tmp_path, hf_model):
  src = checkpoints.write_original(str(tmp_path / "src"), hf_model, "bin")
  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  state = torch.load(os.path.join(src, "pytorch_model.bin"), weights_only=True)
  state["evil"] = Payload()
  torch.save(state, os.path.join(src, "pytorch_model.bin"), pickle_module=pickle)
  _expect_failure(tmp_path, src, "refusing to load.*system")
  assert not marker.exists()


def test_existing_destination_needs_overwrite_and_survives_a_failed_overwrite(tmp_path, hf_model):
  good = checkpoints.write_hf(str(tmp_path / "good"), hf_model)
  dst = str(tmp_path / "dst")
  convert.convert_checkpoint(good, dst, "float32")
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert.convert_checkpoint(good, dst, "float32")
  state = _original_state(hf_model)
  del state["gen_embed.weight"]
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps(checkpoints.original_config(hf_model.config)))
  from safetensors.torch import save_file
  save_file(state, str(bad / "model.safetensors"))
  with pytest.raises(KeyError):
    convert.convert_checkpoint(str(bad), dst, "float32", overwrite=True)
  _assert_matches_oracle(pretrained.load_pretrained(dst, with_tokenizer=False), hf_model)
  convert.convert_checkpoint(good, dst, "bfloat16", overwrite=True)
  assert pretrained.load_pretrained(dst, with_tokenizer=False).config.param_dtype == "bfloat16"



def test_overwrite_replaces_only_janus_jax_outputs(tmp_path, hf_model, monkeypatch):
  src = checkpoints.write_hf(str(tmp_path / "models" / "src"), hf_model)
  before = sorted(os.listdir(src))
  # The source itself, or a folder holding it: refused before any work, nothing touched.
  for dst in (src, str(tmp_path / "models")):
    with pytest.raises(ValueError, match=r"contains\) the input"):
      convert.convert_checkpoint(src, dst, "float32", overwrite=True)
  assert sorted(os.listdir(src)) == before
  # ... also when the input is reached through a symlink.
  link = tmp_path / "link_to_src"
  link.symlink_to(src)
  with pytest.raises(ValueError, match=r"contains\) the input"):
    convert.convert_checkpoint(str(link), str(tmp_path / "models"), "float32", overwrite=True)
  assert sorted(os.listdir(src)) == before
  # A folder of someone's files.
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  (theirs / "thesis.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not written by janus_jax"):
    convert.convert_checkpoint(src, str(theirs), "float32", overwrite=True)
  assert (theirs / "thesis.txt").read_text() == "keep me"
  # Our own output is replaced, and its mode follows the umask, not mkdtemp's 0700.
  dst = str(tmp_path / "dst")
  old_mask = os.umask(0o022)
  try:
    convert.convert_checkpoint(src, dst, "float32")
    assert os.stat(dst).st_mode & 0o777 == 0o755
    assert os.path.exists(os.path.join(dst, pretrained.OUTPUT_MARKER))
    # A failure between the two renames puts the good directory back.
    real_rename = os.rename

    def flaky_rename(a, b):
      if b == dst and ".dst.tmp-" in a:  # the new directory's rename into place
        raise OSError("disk went away")
      real_rename(a, b)
    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError, match="disk went away"):
      convert.convert_checkpoint(src, dst, "bfloat16", overwrite=True)
    monkeypatch.undo()
    assert pretrained.load_pretrained(dst, with_tokenizer=False).config.param_dtype == "float32"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".dst.")]  # no leftovers
  finally:
    os.umask(old_mask)


# --- config translation ------------------------------------------------------------------------

def _arch(model_config) -> dict:
  """The architecture fields (training configs pick their own dtypes and remat policy)."""
  d = model_config.to_dict()
  for key in ("dtype", "param_dtype", "remat_policy"):
    d.pop(key)
  return d


SIGLIP_PARAMS = {"image_size": 384, "model_name": "siglip_large_patch16_384",
                 "select_feature": "same", "select_layer": -1}


def _released_original_config(d: int, language_config: dict) -> dict:
  """As in the released config.json files (reference facts, section 2)."""
  return {
      "architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality",
      "language_config": language_config,
      "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": SIGLIP_PARAMS},
      "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                         "params": {"depth": 2, "input_dim": 1024, "n_embed": d, "projector_type": "mlp_gelu"}},
      "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                            "params": {"image_token_size": 16384, "n_embed": 8}},
      "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                             "params": {"depth": 2, "input_dim": 8, "n_embed": d, "projector_type": "mlp_gelu"}},
      "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                          "params": {"image_token_embed": d, "image_token_size": 16384, "n_embed": d}},
  }


def test_released_pro_7b_config_with_sparse_language_fields():
  sparse = {"_attn_implementation_autoset": True, "max_position_embeddings": 16384,
            "model_type": "llama", "num_hidden_layers": 30, "torch_dtype": "bfloat16",
            "vocab_size": 102400}
  ours = convert.model_config_from_json(_released_original_config(4096, sparse))
  assert _arch(ours) == _arch(load_config("janus_pro_7b").model)


@pytest.mark.parametrize("name", ["janus_pro_1b", "janus_1_3b"])
def test_released_1b_configs(name):
  lang = {"hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 16384,
          "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": 24,
          "num_key_value_heads": 16, "torch_dtype": "bfloat16", "vocab_size": 102400}
  ours = convert.model_config_from_json(_released_original_config(2048, lang))
  assert _arch(ours) == _arch(load_config(name).model)


def test_transformers_schema_maps_to_the_same_config():
  """deepseek-community/Janus-Pro-1B's config (JanusConfig with the released sub-configs)."""
  from transformers import JanusConfig

  text = dict(model_type="llama", vocab_size=102400, hidden_size=2048, intermediate_size=5632,
              num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
              max_position_embeddings=16384, rms_norm_eps=1e-6, rope_theta=10000.0)
  hf = JanusConfig(text_config=text, vision_config=dict(projection_dim=2048),
                   vq_config=dict(projection_dim=2048, image_token_embed_dim=2048),
                   tie_word_embeddings=False).to_dict()
  assert _arch(convert.config_from_hf(hf)) == _arch(load_config("janus_pro_1b").model)
  # ... and export writes back a config that transformers reads as the same model.
  again = convert.config_from_hf(JanusConfig(**convert.hf_config_dict(convert.config_from_hf(hf))).to_dict())
  assert _arch(again) == _arch(load_config("janus_pro_1b").model)


def test_select_layer_truncates_the_tower():
  cfg = _released_original_config(2048, {"hidden_size": 2048, "num_attention_heads": 16})
  cfg["vision_config"]["params"] = {**SIGLIP_PARAMS, "select_layer": -2}
  assert convert.model_config_from_json(cfg).vision.depth == 23
  cfg["vision_config"]["params"] = {**SIGLIP_PARAMS, "model_name": "mystery_vit"}
  with pytest.raises(ValueError, match="unknown vision tower 'mystery_vit'"):
    convert.model_config_from_json(cfg)


def test_eval_shape_of_a_converted_config_matches_the_model():
  """The converter builds its targets from the model: nothing to drift between the two."""
  model = janus_lib.build(load_config("tiny").model)
  flat = convert._flat_abstract(model)
  keys = {convert.hf_key(path)[0] for path in flat}
  assert len(keys) == len(flat)  # every parameter has its own key


@pytest.mark.parametrize("specials,family", [(["<image_placeholder>", "<|User|>", "<|Assistant|>"], "janus_pro"),
                                             (["<image_placeholder>"], "janus")])
def test_tokenizer_and_processor_travel_with_the_checkpoint(tmp_path, hf_model, specials, family):
  import pathlib

  from test_tokenizer import build_hf_json

  src = pathlib.Path(checkpoints.write_hf(str(tmp_path / "src"), hf_model))
  build_hf_json(src)
  (src / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": specials}))
  dst = str(tmp_path / "dst")
  assert convert.main([src.as_posix(), dst, "--dtype", "float32"]) == 0
  assert {"tokenizer.json", "special_tokens_map.json"} <= set(os.listdir(dst))
  loaded = pretrained.load_pretrained(dst)
  assert loaded.family == family
  tok = loaded.tokenizer
  batch = loaded.processor.generation_batch(["a red cube", "a cat"])
  ids = batch["input_ids"]
  assert (ids[:, -1] == tok.begin_of_image_id).all()
  assert tok.image_placeholder_id == tok.token_to_id("<image_placeholder>")
  role = "<|User|>" if family == "janus_pro" else "User"
  assert tok.decode(ids[1][batch["attention_mask"][1]], skip_special_tokens=False).startswith(
      "<｜begin▁of▁sentence｜>" + role + ": a cat")


def test_an_export_generates_images_in_transformers(tmp_path, hf_model):
  """transformers' image mode reads generation_kwargs["boi_token_id"] from the generation config:
  the export writes it (and the special ids) from the tokenizer, and generates the tokens the
  source model generates."""
  import pathlib

  from transformers import JanusForConditionalGeneration
  from test_tokenizer import build_hf_json

  src = pathlib.Path(checkpoints.write_hf(str(tmp_path / "src"), hf_model))
  build_hf_json(src)
  jax_dir, out = str(tmp_path / "jax"), str(tmp_path / "exported")
  assert convert.main([src.as_posix(), jax_dir, "--dtype", "float32"]) == 0
  assert convert.main([jax_dir, out, "--to-pytorch"]) == 0
  tok = pretrained.load_pretrained(jax_dir).tokenizer
  reloaded = JanusForConditionalGeneration.from_pretrained(out).eval()
  gen = reloaded.generation_config
  assert gen.generation_kwargs == {"boi_token_id": tok.begin_of_image_id}
  assert (gen.bos_token_id, gen.pad_token_id) == (tok.bos_id, tok.pad_id)
  ids = torch.tensor([[tok.bos_id, 40, 41, 42, tok.begin_of_image_id]])
  run = lambda m: m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             generation_mode="image", guidance_scale=3.0)
  source = copy.deepcopy(hf_model)  # the module's oracle stays as it is
  for key, value in dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                         generation_kwargs={"boi_token_id": tok.begin_of_image_id}).items():
    setattr(source.generation_config, key, value)
  with torch.no_grad():
    assert torch.equal(run(reloaded), run(source))


def test_exported_models_keep_the_system_prompt_they_were_trained_with(tmp_path, hf_model):
  import pathlib

  from test_tokenizer import build_hf_json

  src = pathlib.Path(checkpoints.write_hf(str(tmp_path / "src"), hf_model))
  build_hf_json(src)
  loaded = pretrained.load_pretrained(str(src), dtype="float32")  # converted in memory
  assert loaded.processor.system_prompt.startswith("You are a helpful language and vision assistant")
  dst = str(tmp_path / "trained")
  pretrained.write_converted(dst, loaded.params, loaded.config, "janus_pro", str(src), overwrite=False,
                             extra={"system_prompt": ""})
  again = pretrained.load_pretrained(dst)
  assert again.processor.system_prompt == ""
  batch = again.processor.understanding_batch(["What is it?"], [[np.zeros((8, 8, 3), np.uint8)]])
  text = again.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0]].tolist(),
                                skip_special_tokens=False)
  assert text.startswith("<｜begin▁of▁sentence｜><|User|>: <begin_of_image>"), text
  assert int(batch["image_mask"].sum()) == 16  # the understanding encoder's patch count


def test_a_tensor_reading_past_its_storage_is_refused(tmp_path):
  """A .bin's tensor (offset, shape, stride) must lie inside its storage: a crafted or damaged
  pickle must not read neighbouring memory (as_strided does not check)."""
  path = tmp_path / "t.bin"
  torch.save({"w": torch.arange(4, dtype=torch.float32)}, path)
  good = torch_io.load_torch_pickle(str(path))["w"]
  np.testing.assert_array_equal(good.load(), np.arange(4, dtype=np.float32))
  import zipfile
  archive = zipfile.ZipFile(path)
  prefix = archive.namelist()[0].split("/")[0]
  storage = (good._storage_key, good.dtype, 4)
  tail = torch_io.LazyTensor(archive, prefix, storage, 1, (3,), (1,))
  np.testing.assert_array_equal(tail.load(), [1, 2, 3])
  for offset, shape, stride in [(2, (6,), (1,)), (0, (2, 2), (3, 1)), (4, (), ())]:
    with pytest.raises(torch_io.CorruptCheckpointError, match="reads past them"):
      torch_io.LazyTensor(archive, prefix, storage, offset, shape, stride).load()


def test_a_fused_qkv_that_does_not_split_in_three_is_refused():
  from janus_jax import original_format

  key = "vision_model.vision_tower.blocks.0.attn.qkv.weight"
  source = original_format.OriginalAsHF({key: np.zeros((3073, 2), np.float32)})
  hf_key = next(k for k in source if "q_proj.weight" in k)
  with pytest.raises(ValueError, match=rf"{key}: a fused qkv of shape \(3073, 2\) does not split"):
    source[hf_key]


# --- ambiguous or unusual checkpoints ----------------------------------------------------------

def test_two_tensors_for_one_parameter_are_refused(tmp_path, hf_model):
  state = _original_state(hf_model)
  state["lm_head.weight"] = torch.zeros_like(state["language_model.lm_head.weight"])
  _expect_failure(tmp_path, _write_state(tmp_path, hf_model, state),
                  "'language_model.lm_head.weight' and 'lm_head.weight' both map to 'lm_head.weight'")


def test_an_aligner_tensor_at_a_gelu_index_is_unexpected(tmp_path, hf_model):
  state = _original_state(hf_model)
  state["aligner.layers.1.weight"] = torch.zeros_like(state["aligner.layers.0.weight"])
  _expect_failure(tmp_path, _write_state(tmp_path, hf_model, state),
                  r"unexpected tensors \['aligner.layers.1.weight'\]")


def _write_sharded(directory, hf_model, weight_map_edit=None, duplicate=None) -> str:
  """A transformers directory with the state split over two safetensors shards and an index."""
  from safetensors.torch import save_file

  os.makedirs(directory)
  hf_model.config.to_json_file(os.path.join(directory, "config.json"))
  state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
  keys = sorted(state)
  shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
  weight_map = {k: name for name, ks in shards.items() for k in ks}
  for name, ks in shards.items():
    part = {k: state[k] for k in ks}
    if duplicate and name == "b.safetensors":  # a stale zeroed copy of a tensor of shard a
      part[duplicate] = torch.zeros_like(state[duplicate])
    save_file(part, os.path.join(directory, name))
  weight_map.update(weight_map_edit or {})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return directory


def test_sharded_checkpoints_read_each_tensor_from_the_shard_the_index_names(tmp_path, hf_model):
  key = "lm_head.weight"
  # b also holds a zeroed copy of a's tensor: the index says a, so a's is read.
  src = _write_sharded(str(tmp_path / "dup"), hf_model, duplicate=key)
  assert convert.main([src, str(tmp_path / "out"), "--dtype", "float32"]) == 0
  _assert_matches_oracle(pretrained.load_pretrained(str(tmp_path / "out"), with_tokenizer=False),
                         hf_model)
  # An index naming the wrong shard, or a tensor no shard holds, names the index.
  wrong = "b.safetensors" if key in torch_io.SafetensorsFile(
      os.path.join(src, "a.safetensors")).keys() else "a.safetensors"
  for edit in ({key: wrong}, {"ghost.weight": "a.safetensors"}):
    bad = _write_sharded(str(tmp_path / f"bad{len(os.listdir(tmp_path))}"), hf_model, edit)
    with pytest.raises(torch_io.CorruptCheckpointError, match="index.json: 1 tensors are not in the shard"):
      convert.convert_checkpoint(bad, str(tmp_path / "never"), "float32")
  assert not os.path.exists(tmp_path / "never")


def test_tied_transformers_checkpoint_reads_the_head_from_the_embedding(tmp_path, hf_model):
  """save_pretrained with JanusConfig's default tie_word_embeddings=True leaves lm_head out."""
  src = checkpoints.write_hf(str(tmp_path / "src"), hf_model)
  from safetensors.torch import load_file, save_file
  state = load_file(os.path.join(src, "model.safetensors"))
  embed = state["model.language_model.embed_tokens.weight"]
  del state["lm_head.weight"]
  save_file(state, os.path.join(src, "model.safetensors"))
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg["tie_word_embeddings"] = True
  json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
  loaded = pretrained.load_pretrained(src, dtype="float32", with_tokenizer=False)
  np.testing.assert_array_equal(loaded.params["llm"]["lm_head"]["kernel"], embed.numpy().T)
  cfg["tie_word_embeddings"] = False  # untied and no head: the missing tensor is named
  json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
  with pytest.raises(KeyError, match="missing tensor 'lm_head.weight'"):
    pretrained.load_pretrained(src, dtype="float32", with_tokenizer=False)


def test_pytorch_directories_load_in_their_stored_dtype(tmp_path, hf_model):
  src = checkpoints.write_original(str(tmp_path / "f32"), hf_model, "safetensors")
  assert pretrained.load_pretrained(src, with_tokenizer=False).config.param_dtype == "float32"
  state = {k: v.to(torch.bfloat16) for k, v in _original_state(hf_model).items()}
  src = _write_state(tmp_path, hf_model, state)
  loaded = pretrained.load_pretrained(src, with_tokenizer=False)
  assert loaded.config.param_dtype == "bfloat16"
  assert loaded.params["llm"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16


def test_config_fields_are_read_or_refused(tmp_path, hf_model):
  cfg = hf_model.config.to_dict()
  cfg["vision_config"]["layer_norm_eps"] = 1e-5
  assert convert.model_config_from_json(cfg).vision.layer_norm_eps == 1e-5
  cfg["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
  with pytest.raises(ValueError, match="config.json: RoPE type 'yarn' is not supported"):
    convert.model_config_from_json(cfg)
  # An activation our modules do not implement converted to a different model (text logits off
  # by 1.05 with gelu in the LLM): refused, naming the block.
  for block, act in (("text_config", "gelu"), ("vision_config", "gelu_pytorch_tanh"),
                     ("vq_config", "relu")):
    other = hf_model.config.to_dict()
    other[block]["hidden_act"] = act
    with pytest.raises(ValueError, match=f"config.json: {block}.hidden_act '{act}' is not supported"):
      convert.model_config_from_json(other)
  original = checkpoints.original_config(hf_model.config)
  original["language_config"]["hidden_act"] = "relu"
  with pytest.raises(ValueError, match="language_config.hidden_act 'relu' is not supported"):
    convert.model_config_from_json(original)
  original = checkpoints.original_config(hf_model.config)
  original["language_config"] = None
  with pytest.raises(ValueError, match="config.json: cannot read the original config"):
    convert.model_config_from_json(original)


def test_restoring_params_of_another_size_names_the_parameter(tmp_path, hf_model):
  src = checkpoints.write_hf(str(tmp_path / "src"), hf_model)
  dst = str(tmp_path / "dst")
  convert.convert_checkpoint(src, dst, "float32")
  loaded = pretrained.load_pretrained(dst, with_tokenizer=False)
  bigger = loaded.config.copy_and_resolve_references()
  bigger.llm.mlp_dim *= 2
  with pytest.raises(ValueError, match=r"parameter llm/decoder/layers/mlp/\w+_proj/kernel is "
                                       r"stored with shape"):
    pretrained.restore_params(dst, janus_lib.build(bigger))


_KILLED_WRITER = r"""
import os, sys, time
from janus_jax import pretrained
dst, between_renames = sys.argv[1], sys.argv[2] == "1"
real_rename = os.rename
def stalled_rename(a, b):
  if b == dst and ".tmp-" in a:  # the new directory's rename into place: stop here
    print("ready", flush=True)
    time.sleep(600)
  real_rename(a, b)
os.rename = stalled_rename
with pretrained.atomic_directory(dst) as tmp:
  with open(os.path.join(tmp, "weights"), "w") as f:
    f.write("new")
  if not between_renames:
    print("ready", flush=True)
    time.sleep(600)
"""


def _kill_a_writer(dst: str, between_renames: bool) -> None:
  """Starts a process writing dst through atomic_directory and kill -9s it at the given point."""
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, dst, str(int(between_renames))],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready"
  finally:
    proc.kill()
    proc.wait()


def _write_dir(dst: str, text: str, overwrite: bool = True) -> None:
  with pretrained.atomic_directory(dst, overwrite) as tmp:
    with open(os.path.join(tmp, "weights"), "w") as f:
      f.write(text)


def test_leftovers_of_a_killed_writer_are_cleared_and_a_hidden_good_output_put_back(tmp_path):
  dst = str(tmp_path / "out")
  _write_dir(dst, "good")
  # Killed while filling its temporary sibling: dst untouched, the sibling left behind.
  _kill_a_writer(dst, between_renames=False)
  assert [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
  # A live writer's sibling (this process's tag) stays.
  live = tmp_path / f".out.tmp-{pretrained._owner_tag()}-abcd1234"
  live.mkdir()
  (live / pretrained.OUTPUT_MARKER).touch()
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    _write_dir(dst, "refused", overwrite=False)
  assert sorted(os.listdir(tmp_path)) == sorted([live.name, "out"])  # the dead one's is gone
  assert open(os.path.join(dst, "weights")).read() == "good"
  live.rename(tmp_path / "live_writer_was_kept")
  # Killed between its two renames: the previous output sits hidden in .out.old-*/x, and no dst.
  _kill_a_writer(dst, between_renames=True)
  assert not os.path.exists(dst)
  assert [n for n in os.listdir(tmp_path) if n.startswith(".out.old-")]
  # The next writer puts it back first, so without --overwrite it refuses, and nothing is lost.
  # The check before a conversion's work does so too (it used to see no dst, convert, then refuse).
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    pretrained.check_destination(dst, overwrite=False)
  assert open(os.path.join(dst, "weights")).read() == "good"
  assert sorted(os.listdir(tmp_path)) == ["live_writer_was_kept", "out"]
  _write_dir(dst, "newer")
  assert open(os.path.join(dst, "weights")).read() == "newer"
