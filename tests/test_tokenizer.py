"""Tokenizer wrapper on a local DeepSeek-style byte-level BPE tokenizer.json and on a trained
sentencepiece model: round trips, BOS exactly once, looked-up special ids, clear errors."""

import io
import json

import pytest
import sentencepiece as spm
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from janus_jax import tokenizer as tk
from janus_jax.tokenizer import Tokenizer, train_sentencepiece

# Order chosen so no id coincides with an assumed default (pad is not 2, placeholder not 3).
HF_SPECIALS = [tk.BOS_TOKEN, tk.EOS_TOKEN, tk.USER_TAG, tk.ASSISTANT_TAG, tk.IMAGE_START_TAG,
               tk.IMAGE_END_TAG, tk.PAD_TAG, tk.IMAGE_TAG]
CORPUS = ([f"The quick brown fox {i} jumps over the lazy dog; price ${i * 7}.00!"
           for i in range(60)]
          + ["Hello, how are you?", "A snowman ☃, 漢字 and naïve café.", "Describe the image.\n\n"])
TEXTS = ["Hello, how are you?", "  two  spaces\n\nand\ttabs  ", "snowman ☃ 漢字 emoji 🙂",
         f"{tk.USER_TAG}: {tk.IMAGE_TAG}\nWhat is this?\n\n{tk.ASSISTANT_TAG}:", "", "x"]


def build_hf_json(path, specials=HF_SPECIALS, bos_in_post_processor=True):
  """The DeepSeek-LLM tokenizer.json layout: digit split + regex split + byte level."""
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
      pre_tokenizers.Split(Regex(r"[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
                                 r"|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=500, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if bos_in_post_processor:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{tk.BOS_TOKEN} $A", special_tokens=[(tk.BOS_TOKEN, tok.token_to_id(tk.BOS_TOKEN))])
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  return path / "tokenizer.json"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  build_hf_json(d)
  config = {"tokenizer_class": "LlamaTokenizer", "bos_token": {"content": tk.BOS_TOKEN},
            "eos_token": tk.EOS_TOKEN, "pad_token": None, "model_max_length": 16384}
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  return d


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("sp")
  train_sentencepiece(CORPUS, 400, d / "tiny.model")
  return d


@pytest.fixture(scope="module", params=["hf", "sp"])
def tok(request, hf_dir, sp_dir):
  return Tokenizer.from_dir(hf_dir if request.param == "hf" else sp_dir)


def test_round_trip_and_single_bos(tok):
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=False).endswith(text)
    assert tok.encode(text, add_bos=False) == ids[1:]
  assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
  assert tok.encode_batch(TEXTS, add_bos=False) == [tok.encode(t, add_bos=False) for t in TEXTS]


def test_specials_are_single_tokens_in_running_text(tok):
  for s in tk.SP_SPECIALS:
    i = tok.token_to_id(s)
    assert i is not None
    assert tok.encode(f"ab{s}cd {s}\n{s}", add_bos=False).count(i) == 3
  ids = tok.encode(TEXTS[3])
  assert ids.count(tok.image_placeholder_id) == 1
  assert tok.decode(ids) == ": \nWhat is this?\n\n:"  # specials skipped by default
  assert tok.token_to_id("<not_a_token>") is None


def test_hf_special_ids_looked_up(hf_dir):
  t = Tokenizer.from_dir(hf_dir)
  raw = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
  for prop, s in [("bos_id", tk.BOS_TOKEN), ("eos_id", tk.EOS_TOKEN), ("pad_id", tk.PAD_TAG),
                  ("image_placeholder_id", tk.IMAGE_TAG),
                  ("begin_of_image_id", tk.IMAGE_START_TAG), ("end_of_image_id", tk.IMAGE_END_TAG)]:
    assert getattr(t, prop) == raw.token_to_id(s) == HF_SPECIALS.index(s)
  assert t.vocab_size == raw.get_vocab_size()
  # The post-processor adds BOS; our encode must neither drop nor double it.
  assert raw.encode("Hello").ids == t.encode("Hello")
  assert t.encode(tk.BOS_TOKEN + "Hello") == t.encode("Hello")


def test_hf_without_post_processor_still_adds_bos(tmp_path):
  build_hf_json(tmp_path, bos_in_post_processor=False)
  t = Tokenizer.from_dir(tmp_path)
  assert t.encode("Hello")[0] == t.bos_id == 0
  assert t.encode("Hello")[1:] == t.encode("Hello", add_bos=False)


def test_sp_special_ids(sp_dir):
  t = Tokenizer.from_dir(sp_dir)
  assert (t.pad_id, t.bos_id, t.eos_id) == (0, 2, 3)
  assert [t.token_to_id(s) for s in tk.SP_SPECIALS] == [4, 5, 6, 7, 8]
  assert t.decode([2, *t.encode("hi", add_bos=False), 3], skip_special_tokens=False) == \
      f"{tk.BOS_TOKEN}hi{tk.EOS_TOKEN}"
  # Control strings in text map to their ids, as tokenizer.json's special tokens do.
  ids = t.encode(f"a{tk.EOS_TOKEN}b{tk.PAD_TAG}", add_bos=False)
  assert ids == t.encode("a", add_bos=False) + [3] + t.encode("b", add_bos=False) + [0]


def test_matches_transformers_fast_tokenizer(hf_dir):
  from transformers import PreTrainedTokenizerFast

  t = Tokenizer.from_dir(hf_dir)
  ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"),
                                bos_token=tk.BOS_TOKEN, eos_token=tk.EOS_TOKEN)
  for text in TEXTS:
    assert t.encode(text) == ref.encode(text)
    assert t.decode(t.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)


def test_missing_placeholder_is_added(tmp_path):
  without = [s for s in HF_SPECIALS if s != tk.IMAGE_TAG]
  build_hf_json(tmp_path / "hf", specials=without)
  t = Tokenizer.from_dir(tmp_path / "hf")
  before = HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).get_vocab_size()
  assert t.image_placeholder_id == before and t.vocab_size == before + 1
  assert t.encode(f"a{tk.IMAGE_TAG}b", add_bos=False).count(t.image_placeholder_id) == 1
  # Saving keeps the added token.
  assert Tokenizer.from_dir(t.save(tmp_path / "saved").parent).image_placeholder_id == before

  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf,
                                 vocab_size=350, byte_fallback=True, minloglevel=2)
  (tmp_path / "sp").mkdir()
  (tmp_path / "sp" / "plain.model").write_bytes(buf.getvalue())
  s = Tokenizer.from_dir(tmp_path / "sp")
  assert s.image_placeholder_id == 350 and s.vocab_size == 351
  ids = s.encode(f"a {tk.IMAGE_TAG} b", add_bos=False)
  assert ids.count(350) == 1 and s.decode(ids, skip_special_tokens=False) == f"a {tk.IMAGE_TAG} b"


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    Tokenizer.from_dir(tmp_path)
  build_hf_json(tmp_path, specials=[tk.BOS_TOKEN, tk.EOS_TOKEN])
  t = Tokenizer.from_dir(tmp_path)
  for prop, token in [("begin_of_image_id", tk.IMAGE_START_TAG),
                      ("end_of_image_id", tk.IMAGE_END_TAG), ("pad_id", tk.PAD_TAG)]:
    with pytest.raises(KeyError, match="tokenizer.json") as err:
      getattr(t, prop)
    assert token in str(err.value)


def test_configured_pad_token_fallback(tmp_path):
  build_hf_json(tmp_path, specials=[tk.BOS_TOKEN, tk.EOS_TOKEN])
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": tk.EOS_TOKEN}))
  assert Tokenizer.from_dir(tmp_path).pad_id == 1


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_save_round_trip(kind, hf_dir, sp_dir, tmp_path):
  t = Tokenizer.from_dir(hf_dir if kind == "hf" else sp_dir)
  t.save(tmp_path)
  u = Tokenizer.from_dir(tmp_path)
  assert [u.encode(x) for x in TEXTS] == [t.encode(x) for x in TEXTS]
  assert (u.bos_id, u.eos_id, u.pad_id) == (t.bos_id, t.eos_id, t.pad_id)
  if kind == "hf":
    assert (tmp_path / "tokenizer_config.json").read_bytes() == \
        (hf_dir / "tokenizer_config.json").read_bytes()


def test_load_errors_name_the_file(tmp_path):
  bad_json = tmp_path / "bad_json"
  bad_json.mkdir()
  (bad_json / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match=f"{bad_json / 'tokenizer.json'}: not a readable"):
    Tokenizer.from_dir(bad_json)
  for name, text, message in [("tokenizer_config.json", "{oops", "not valid JSON"),
                              ("special_tokens_map.json", "[1, 2]", "expected a JSON object")]:
    d = tmp_path / name
    build_hf_json(d)
    (d / name).write_text(text)
    with pytest.raises(ValueError, match=f"{d / name}: {message}"):
      Tokenizer.from_dir(d)


def test_padding_and_truncation_saved_in_tokenizer_json_are_ignored(tmp_path, hf_dir):
  """transformers applies a tokenizer.json's padding / truncation only when a call asks; ours
  never does (a prompt would lose <begin_of_image> or gain pads marked as real)."""
  file = build_hf_json(tmp_path)
  backend = HFTokenizer.from_file(str(file))
  backend.enable_padding(length=40, pad_id=backend.token_to_id(tk.PAD_TAG), pad_token=tk.PAD_TAG)
  backend.enable_truncation(max_length=4)
  backend.save(str(file))
  clean = Tokenizer.from_dir(hf_dir)
  saved = Tokenizer.from_dir(tmp_path)
  texts = ["a long sentence that is much longer than four tokens", "x"]
  assert saved.encode_batch(texts) == clean.encode_batch(texts)
  assert len(saved.encode(texts[0])) > 5


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_ids_past_the_vocabulary_decode_to_nothing(kind, hf_dir, sp_dir):
  """The LLM's table is larger than the tokenizer (102400 rows, ~100015 tokens): a sampled id
  past it must not crash the sentencepiece backend (tokenizers skips it)."""
  t = Tokenizer.from_dir(hf_dir if kind == "hf" else sp_dir)
  ids = t.encode("Hello", add_bos=False)
  for skip in (True, False):
    assert t.decode(ids + [t.vocab_size + 5, t.vocab_size], skip) == t.decode(ids, skip)
