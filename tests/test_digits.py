"""The offline digits demo's pieces: data + tokenizer (digits.prepare), stage-0 VQ training, and
the evaluation on a random tiny model."""

from __future__ import annotations

import dataclasses
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from janus_jax import encoder_pretraining, eval_digits, processing, training, vq_training
from janus_jax.data import digits, packing, pipeline, transforms
from janus_jax.models import janus as janus_lib
from janus_jax.models import presets
from janus_jax.pretrained import load_pretrained, write_converted
from janus_jax.tokenizer import SP_SPECIALS, Tokenizer

LIMIT = 40  # examples per split
# The smallest VQ the module builds (GroupNorm needs 32 channels): 32 px -> 16 x 16 tokens.
TINY_VQ = dict(codebook_size=32, codebook_dim=8, z_channels=32, base_channels=32,
               channel_multipliers=(1, 2), num_res_blocks=1, grid_size=16)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("digits")
  data, tok = str(root / "data"), str(root / "tok")
  digits.prepare(data, tok, limit=LIMIT)
  return data, tok


def test_mnist5k_split_is_stratified_and_deterministic():
  images, labels = digits.load_mnist5k()
  assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
  assert np.bincount(labels).tolist() == [500] * 10
  train, test = digits.split_indices(labels, seed=0)
  assert len(train) == 4500 and len(test) == 500 and not set(train) & set(test)
  assert np.bincount(labels[test]).tolist() == [50] * 10
  again = digits.split_indices(labels, seed=0)
  assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
  assert not np.array_equal(test, digits.split_indices(labels, seed=1)[1])
  padded, _ = digits.load_split("test")
  assert padded.shape == (500, 32, 32)
  assert np.array_equal(padded[:, 2:30, 2:30], images[test]) and padded[:, :2].max() == 0


def test_prepare_builds_readable_datasets(built):
  data, _ = built
  _, test_idx = digits.split_indices(digits.load_mnist5k()[1], seed=0)
  want_test_images, want_test_labels = digits.load_split("test")
  for split in ("train", "test"):
    caps = tfds.data_source(digits.CAPTIONS, split=split, data_dir=data)
    chat = tfds.data_source(digits.CHAT, split=split, data_dir=data)
    assert len(caps) == len(chat) == LIMIT
    for i in range(0, LIMIT, 7):
      ex = caps[i]
      name, label = digits.NAMES[ex["label"]], ex["label"]
      assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.uint8
      text = ex["caption"].decode()
      assert name in text or str(label) in text, text
      c = chat[i]
      assert [r.decode() for r in c["messages"]["role"]] == ["user", "assistant"]
      question, answer = (m.decode() for m in c["messages"]["content"])
      assert question.startswith(processing.IMAGE_TAG + "\n") and answer == digits.NAMES[c["label"]]
      assert len(c["images"]) == 1 and np.asarray(c["images"][0]).shape == (32, 32, 1)
      if split == "test":  # the stored split is the one load_split (and the eval) reads
        assert np.array_equal(ex["image"][..., 0], want_test_images[i])
        assert label == want_test_labels[i]
  text = tfds.data_source(digits.TEXT, split="train", data_dir=data)
  assert 0 < len(text) <= LIMIT and text[0]["text"].decode() in digits.sentences()
  # Idempotent: a second call keeps what is there; other arguments are refused.
  stamp = os.path.getmtime(os.path.join(data, digits.CAPTIONS))
  digits.prepare(data, built[1], limit=LIMIT)
  assert os.path.getmtime(os.path.join(data, digits.CAPTIONS)) == stamp
  with pytest.raises(ValueError, match="built with"):
    digits.prepare(data, built[1], limit=LIMIT, seed=3)


def test_tokenizer_round_trips_the_demo_strings(built):
  tok = Tokenizer.from_dir(built[1])
  assert tok.vocab_size == digits.VOCAB_SIZE
  for special in SP_SPECIALS:
    assert tok.encode(special, add_bos=False) == [tok.token_to_id(special)]
  assert len({tok.bos_id, tok.eos_id, tok.pad_id, tok.image_placeholder_id,
              tok.begin_of_image_id, tok.end_of_image_id}) == 6
  unk = tok.token_to_id("<unk>")
  strings = digits.corpus() + [processing.understanding_prompt(q, "janus_pro")
                               for q in digits.QUESTIONS]
  for s in set(strings):
    ids = tok.encode(s, add_bos=False)
    assert unk not in ids and tok.decode(ids, skip_special_tokens=False) == s, s
  # The demo's words are whole pieces, not byte fallbacks.
  assert len(tok.encode("a handwritten digit seven", add_bos=False)) <= 4


def test_pipeline_reads_the_built_datasets(built):
  data, tok_dir = built
  tok = Tokenizer.from_dir(tok_dir)
  c = pipeline.default_config()
  c.update(dict(seq_len=96, image_size=32, gen_image_size=32, num_image_tokens_und=16,
                num_image_tokens_gen=16, max_images_per_row=2, read_threads=0, prefetch=0))
  c.sources.understanding = pipeline.source_config(digits.CHAT, data_dir=data,
                                                   features=digits.CHAT_FEATURES)
  c.sources.text = pipeline.source_config(digits.TEXT, data_dir=data, features=digits.TEXT_FEATURES)
  c.sources.generation = pipeline.source_config(digits.CAPTIONS, data_dir=data,
                                                features=digits.CAPTION_FEATURES)
  pipeline.check_sources(c, (1, 1, 1))
  it = pipeline.make_pipeline(c, tok, "janus_pro", seed=0, mixture=(1, 1, 1), batch_size=4,
                              image_tokenizer=lambda x: np.full((len(x), 16), 7, np.int32))
  batches = [next(it) for _ in range(3)]
  it.close()  # stops the prefetch thread
  assert batches[0]["input_ids"].shape == (4, 96)
  assert batches[0]["pixels"].shape == (4, 2, 32, 32, 3)
  tasks = set(np.concatenate([b["task"][b["segment_ids"] > 0] for b in batches]).tolist())
  assert tasks == {0, 1, 2}
  und = next(b for b in batches if b["image_valid"].any())
  pix = und["pixels"][und["image_valid"]]
  assert pix.min() == -1.0 and pix.max() > 0.9  # black background, white strokes


def test_train_vq_improves_and_saves(tmp_path):
  cfg = presets.vq(**TINY_VQ)
  train, _ = digits.load_split("train")
  test, _ = digits.load_split("test")
  out = str(tmp_path / "vq")
  metrics = vq_training.train_vq(cfg, train[:256], test[:100], steps=12, batch_size=8,
                                 learning_rate=3e-3, seed=0, out_dir=out, log_every=4,
                                 reinit_every=4)
  log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  assert [line["step"] for line in log] == [4, 8, 12]
  assert log[-1]["loss/l2"] < log[0]["loss/l2"]
  assert metrics["psnr"] > metrics["psnr_before"]
  assert 0 < metrics["codebook_usage"] <= 1
  assert json.load(open(os.path.join(out, "metrics.json")))["psnr"] == metrics["psnr"]
  params = vq_training.load_vq(out)
  model = vq_training.vq_model(vq_training.load_vq_config(out))
  init = vq_training.init_vq_params(model, 32, 0)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, init)
  again = vq_training.evaluate(model, params, test[:100])
  assert again["psnr"] == pytest.approx(metrics["psnr"], abs=1e-4)
  # config.compiler_options reach the step's compile: an unknown one fails, naming it, and
  # nothing is written.
  with pytest.raises(Exception, match="xla_no_such_option"):
    vq_training.train_vq(cfg, train[:16], test[:8], steps=2, batch_size=8, learning_rate=3e-3,
                         seed=0, out_dir=str(tmp_path / "bad"),
                         compiler_options={"xla_no_such_option": "1"})
  assert not (tmp_path / "bad").exists()
  with pytest.raises(ValueError, match="steps = 0"):
    vq_training.train_vq(cfg, train[:16], test[:8], steps=0, batch_size=8, learning_rate=3e-3,
                         seed=0, out_dir=str(tmp_path / "bad"))
  with pytest.raises(FloatingPointError, match="diverged"):  # NaN learning rate: nothing written
    vq_training.train_vq(cfg, train[:16], test[:8], steps=2, batch_size=8,
                         learning_rate=float("nan"), seed=0, out_dir=str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()


def test_affine_warp_and_augment():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 6, 1)).astype(np.uint8)
  warp = lambda *a: np.asarray(encoder_pretraining.affine_warp(jnp.asarray(image), *a))
  np.testing.assert_array_equal(warp(90.0, 1.0, jnp.zeros(2)), np.rot90(image, -1))
  np.testing.assert_array_equal(warp(0.0, 1.0, jnp.zeros(2)), image)
  moved = np.zeros_like(image)
  moved[1:, 2:] = image[:-1, :-2]
  np.testing.assert_array_equal(warp(0.0, 1.0, jnp.array([1.0, 2.0])), moved)
  moved = np.zeros_like(image)
  moved[1:] = np.rot90(image, -1)[:-1]  # rotated, then moved down
  np.testing.assert_array_equal(warp(90.0, 1.0, jnp.array([1.0, 0.0])), moved)
  halved = warp(0.0, 0.5, jnp.zeros(2))  # scaled about the centre: the border is zero fill
  assert halved[0].max() == 0 and halved[:, 0].max() == 0 and halved[2:4, 2:4].max() > 0

  batch = jnp.asarray(np.repeat(digits.load_split("test")[0][:1, ..., None], 8, 0))
  out = np.asarray(encoder_pretraining.augment(batch, jax.random.key(0), 2, 12.0, 0.1))
  assert out.shape == batch.shape and out.dtype == np.uint8
  assert len({o.tobytes() for o in out}) == 8  # each image its own map
  assert np.abs(out.astype(float).sum((1, 2, 3)) / float(batch[0].sum()) - 1).max() < 0.35
  shifted = np.asarray(encoder_pretraining.augment(batch, jax.random.key(0), 2))  # whole pixels
  assert set(np.unique(shifted)) <= set(np.unique(np.asarray(batch)))


@pytest.mark.parametrize("head,steps,floor,rotation,scale,cpu_layout",
                         [("flatten", 60, 0.4, 0.0, 0.0, False), ("map", 400, 0.3, 12.0, 0.1, True)])
def test_encoder_pretraining_learns_and_saves(tmp_path, head, steps, floor, rotation, scale,
                                              cpu_layout):
  """Stage 0's stand-in for SigLIP: the classifier beats chance on held-out digits after a few
  steps (with and without rotations and scales; as a scan and as the digits config runs it, a
  Python loop with materialised-transpose weight gradients), and the saved encoder is exactly a
  Janus `understanding_encoder` subtree."""
  vision = presets.vision(image_size=32, patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64)
  train_x, train_y = digits.load_split("train")
  test_x, test_y = digits.load_split("test")
  out = str(tmp_path / "encoder")
  metrics = encoder_pretraining.train_encoder(vision, train_x[:1000], train_y[:1000], test_x,
                                              test_y, steps=steps, batch_size=32,
                                              learning_rate=3e-3, seed=0, out_dir=out, head=head,
                                              max_rotation=rotation, max_scale=scale,
                                              scan_layers=not cpu_layout,
                                              materialize_grad_transpose=cpu_layout)
  print(head, metrics)
  assert metrics["augmentation"] == (2, rotation, scale)
  assert metrics["test_accuracy"] > floor  # chance is 0.1
  params = encoder_pretraining.load_encoder(out)
  cfg = presets.janus(presets.llm(64, 1, 4, 128), vision, presets.vq(**TINY_VQ))
  want = janus_lib.init_params_host(janus_lib.build(cfg), 0)["understanding_encoder"]
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, want)
  with pytest.raises(ValueError, match="config.model.vision.image_size"):
    encoder_pretraining.train_encoder(vision, train_x[:10, :28, :28], train_y[:10], test_x,
                                      test_y, steps=1, batch_size=2, learning_rate=1e-3, seed=0,
                                      out_dir=str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()
  bad_labels = train_y[:10].copy()
  bad_labels[3] = 10  # one past the 10 classes: the loss would be NaN
  for labels, match in ((bad_labels, r"train labels must be integers in \[0, 10\)"),
                        (train_y[:9], r"train labels have shape \(9,\), expected \(10,\)")):
    with pytest.raises(ValueError, match=match):
      encoder_pretraining.train_encoder(vision, train_x[:10], labels, test_x, test_y, steps=1,
                                        batch_size=2, learning_rate=1e-3, seed=0,
                                        out_dir=str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
  with pytest.raises(ValueError, match="steps = 0"):
    encoder_pretraining.train_encoder(vision, train_x[:10], train_y[:10], test_x, test_y,
                                      steps=0, batch_size=2, learning_rate=1e-3, seed=0,
                                      out_dir=str(tmp_path / "bad"))
  # A diverged run (here: a NaN learning rate) writes nothing.
  with pytest.raises(FloatingPointError, match="diverged"):
    encoder_pretraining.train_encoder(vision, train_x[:10], train_y[:10], test_x, test_y,
                                      steps=2, batch_size=2, learning_rate=float("nan"), seed=0,
                                      out_dir=str(tmp_path / "bad"), head=head)
  assert not (tmp_path / "bad").exists()
  with pytest.raises(ValueError, match="head 'mean'"):
    encoder_pretraining.train_encoder(vision, train_x[:10], train_y[:10], test_x, test_y,
                                      steps=1, batch_size=2, learning_rate=1e-3, seed=0,
                                      out_dir=str(tmp_path / "bad"), head="mean")
  assert not (tmp_path / "bad").exists()
  with pytest.raises(Exception, match="xla_no_such_option"):
    encoder_pretraining.train_encoder(vision, train_x[:10], train_y[:10], test_x, test_y,
                                      steps=2, batch_size=2, learning_rate=1e-3, seed=0,
                                      out_dir=str(tmp_path / "bad"), head=head,
                                      compiler_options={"xla_no_such_option": "1"})
  assert not (tmp_path / "bad").exists()


def test_encoder_classifier_runs_the_same_in_its_cpu_layout():
  """The classifier as the digits config trains it (the ViT's layers as a Python loop, weight
  gradients from a materialised x^T) computes the scan's logits and gradients, on the same
  parameters."""
  vision = presets.vision(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64)
  rng = np.random.default_rng(3)
  pixels = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 4))
  plain = encoder_pretraining.Classifier(vision, 10, "map")
  fast = encoder_pretraining.Classifier(vision, 10, "map", scan_layers=False,
                                        materialize_grad_transpose=True)
  params = flax.linen.unbox(jax.jit(plain.init)(jax.random.key(0), pixels)["params"])
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)

  def loss(p, model):
    logits = model.apply({"params": p}, pixels)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

  (want, want_grads), (got, got_grads) = (
      jax.jit(jax.value_and_grad(lambda p, m=m: loss(p, m)))(params) for m in (plain, fast))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def _tiny_checkpoint(tok_dir: str, path: str) -> str:
  cfg = presets.janus(
      presets.llm(64, 2, 4, 128, num_kv_heads=2, vocab_size=digits.VOCAB_SIZE,
                  max_position_embeddings=512),
      presets.vision(image_size=32, patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64),
      presets.vq(**TINY_VQ), aligner_depth=1, generation_aligner_depth=1)
  params = janus_lib.init_params_host(janus_lib.build(cfg), 0)
  write_converted(path, params, cfg, "janus_pro", tok_dir, overwrite=False)
  return path


def test_caption_log_likelihoods_equal_the_training_loss(built, tmp_path):
  """The eval's teacher-forced scores against the training path (a packed row through
  transforms.generation_example, packing.assemble_row and training.loss_and_metrics): per
  (image, prompt), score = -64 x the generation loss; the last column is the CFG-dropped row."""
  _, tok_dir = built
  pre = load_pretrained(_tiny_checkpoint(tok_dir, str(tmp_path / "model")))
  # Random, far from uniform predictions (numpy draws: an eager jax.random per leaf shape
  # compiles once per shape, ~25 s here).
  rng = np.random.default_rng(1)
  pre = dataclasses.replace(pre, params=jax.tree.map(
      lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), pre.params))
  num_tokens, codebook = pre.config.vq.grid_size ** 2, pre.config.vq.codebook_size
  ids_NxL = np.random.default_rng(0).integers(0, codebook, (3, num_tokens))
  captions = ["a handwritten digit seven", "the number 2 written by hand"]
  scores = eval_digits.caption_log_likelihoods(pre, ids_NxL, captions, batch_size=2)
  assert scores.shape == (3, 3) and np.all(scores < 0)
  tok = pre.tokenizer
  loss_fn = jax.jit(lambda params, batch: training.loss_and_metrics(params, pre.model, batch))
  for drop in (0.0, 1.0):
    layout = transforms.Layout(tok, "janus_pro", 300, 1, 32, 32, 16, num_tokens, drop, "", "Q?")
    for p, caption in enumerate(captions if drop == 0 else captions[:1]):
      for i, ids in enumerate(ids_NxL):
        ex = transforms.generation_example(caption, layout, np.random.default_rng(0),
                                           image_ids=ids)
        row = packing.assemble_row([ex], 300, 1, 32, tok.pad_id, tok.image_placeholder_id)
        batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
        _, metrics = loss_fn(pre.params, batch)
        assert float(metrics["tokens/generation"]) == num_tokens
        expected = -num_tokens * float(metrics["loss/generation"])
        column = p if drop == 0 else len(captions)
        np.testing.assert_allclose(scores[i, column], expected, rtol=1e-5, atol=1e-2)
  assert np.all(np.abs(scores[:, 0] - scores[:, 1]) > 1.0)  # the caption matters


def test_eval_on_a_random_tiny_model(built, tmp_path):
  _, tok_dir = built
  ckpt = _tiny_checkpoint(tok_dir, str(tmp_path / "model"))
  run = tmp_path / "run"
  for stage in ("stage1", "stage2"):
    (run / stage).mkdir(parents=True)
    (run / stage / "metrics.jsonl").write_text("".join(
        json.dumps({"stage": stage, "step": s, "loss": 3.0 / s, "loss/text": 2.0 / s,
                    "loss/generation": 4.0 / s}) + "\n" for s in range(1, 5)))
  out = tmp_path / "eval"
  # seed 1 samples and trains the judge; the held-out split stays digits.prepare's default
  # (seed 0): drawn with seed 1, 440 of its 500 digits are in the seed-0 training split.
  results = eval_digits.evaluate(ckpt, out_dir=str(out), run_dir=str(run), cfg_weights=(1.0, 3.0),
                                 images_per_digit=2, und_batch=10, und_limit=20,
                                 classifier_steps=300, seed=1)
  assert results["split"] == {"image_size": 32, "seed": 0, "from": "split_seed"}
  assert results["classifier"]["test_accuracy"] >= 0.95  # on the 500 real held-out digits
  und = results["understanding"]
  assert und["count"] == 20 and 0 <= und["accuracy"] <= 1 and len(und["per_digit"]) == 10
  cond = results["conditioning"]
  assert cond["count"] == 20 and 0 <= cond["accuracy"] <= 1 and len(cond["per_digit"]) == 10
  assert 0 <= cond["information_nats"] <= np.log(10) + 1e-6 and cond["nll_nats"] > 0
  assert set(results["generation"]["cfg"]) == {"1.0", "3.0"}
  for r in results["generation"]["cfg"].values():
    assert 0 <= r["accuracy"] <= 1 and len(r["per_digit"]) == 10
  assert sorted(results["files"]) == ["losses.png", "samples_cfg1.png", "samples_cfg3.png"]
  for name in results["files"]:
    assert (out / name).stat().st_size > 0
  assert json.loads((out / "results.json").read_text())["files"] == results["files"]
  table = eval_digits.markdown_table(results)
  assert table.count("\n| generation, CFG") == 2 and "understanding" in table
  assert "\n| caption classification |" in table


def test_digit_classifier_rejects_bad_input():
  """The judge names what is wrong: labels that do not match the images, a predict before fit,
  images of another size than it was trained on."""
  from janus_jax.digit_classifier import DigitClassifier

  x, y = digits.load_split("test", 32, 0)
  with pytest.raises(ValueError, match=r"images \(20, 32, 32\), labels \(19,\)"):
    DigitClassifier(steps=1).fit(x[:20], y[:19])
  with pytest.raises(ValueError, match="labels in 0-9"):
    DigitClassifier(steps=1).fit(x[:20], y[:20] + 10)
  with pytest.raises(ValueError, match="before fit"):
    DigitClassifier().predict(x[:4])
  with pytest.raises(ValueError, match="steps = 0"):
    DigitClassifier(steps=0)
  judge = DigitClassifier(steps=2, batch_size=8).fit(x[:20], y[:20])
  assert judge.predict(np.repeat(x[:3, ..., None], 3, axis=-1)).shape == (3,)  # RGB -> gray
  with pytest.raises(ValueError, match=r"trained on \(32, 32\) images, got \(28, 28\)"):
    judge.predict(x[:4, :28, :28])
