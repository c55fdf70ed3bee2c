"""Tests for the MoE CLI's tokenizers: round trips, state in checkpoints, gpt2 offline behaviour."""

import json

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch
from tokenizers import Tokenizer

from phase3_components.src.synthetic_stories import generate_stories
from sparse_moe_transformer.src.text_tokenizers import (
    EOT,
    GPT2_OFFLINE_ERROR,
    HFByteLevelBPETokenizer,
    TiktokenTokenizer,
    build_tokenizer,
    load_gpt2_tokenizer,
    load_tokenizer_file,
    tokenizer_from_state,
    train_bpe_tokenizer,
)

SAMPLES = [
    "Once upon a time, there was a little girl named Lily.",
    "",
    " leading space and trailing spaces   ",
    "tabs\tand\nnew lines\r\nand a blank line\n\nend",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji 🤖🚀👩‍👩‍👧 and symbols ∑∫√ ™ © — … «»",
    f"two documents{EOT}joined by the end-of-text token{EOT}",
    "numbers 3.14159 1,000,000 and code: def f(x): return x**2  # comment",
    "\x00\x01 control bytes \x7f and a lone surrogate-free string",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(generate_stories(600, seed=0), vocab_size=600)


def tiny_tiktoken_encoding():
    """A small GPT-2-style tiktoken Encoding built offline: 256 byte tokens, a few merges, EOT."""
    ranks = {bytes([b]): b for b in range(256)}
    for word in (b" t", b"he", b" the", b"in", b" a", b"nd", b" and", b"ed"):
        ranks[word] = len(ranks)
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    return tiktoken.Encoding(
        name="tiny-gpt2-style", pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)}
    )


# ------------------------------------------------------------------------------------------------ bpe


def test_bpe_round_trip_on_varied_text(bpe):
    for text in SAMPLES:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text


def test_bpe_learns_merges_and_special_token(bpe):
    assert bpe.name == "bpe"
    assert bpe.vocab_size == 600  # enough text to reach the requested size
    assert bpe.encode(EOT) == [bpe.eot_id]
    assert bpe.encode(f"a{EOT}b").count(bpe.eot_id) == 1
    story = generate_stories(1, seed=99)[0]
    ids = bpe.encode(story)
    assert len(ids) < len(story.encode("utf-8")) / 2  # merges compress the training domain well
    # "the" in a sentence is one token: merges happened
    assert len(bpe.encode(" the")) == 1


def test_bpe_matches_hf_tokenizer_it_wraps(bpe):
    """Our wrapper adds nothing: ids equal the HF tokenizer's, batch equals one by one."""
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(t) for t in SAMPLES]
    hf = bpe.tokenizer
    for text in SAMPLES:
        assert bpe.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_bpe_state_round_trip_and_in_a_checkpoint(bpe, tmp_path):
    state = bpe.to_state()
    assert json.loads(json.dumps(state)) == state  # JSON-serialisable
    again = tokenizer_from_state(state)
    assert isinstance(again, HFByteLevelBPETokenizer)
    assert again.encode_batch(SAMPLES) == bpe.encode_batch(SAMPLES)
    assert tokenizer_from_state(json.dumps(state)).encode(SAMPLES[4]) == bpe.encode(SAMPLES[4])
    # through a checkpoint saved and loaded the way the training CLI does
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "tokenizer": state}, ckpt)
    loaded = torch.load(ckpt, map_location="cpu", weights_only=True)
    restored = tokenizer_from_state(loaded["tokenizer"])
    assert restored.encode_batch(SAMPLES) == bpe.encode_batch(SAMPLES)
    assert restored.eot_id == bpe.eot_id and restored.vocab_size == bpe.vocab_size


def test_bpe_save_writes_a_standard_tokenizer_json(bpe, tmp_path):
    path = bpe.save(tmp_path / "tokenizer.json")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    hf = Tokenizer.from_file(str(path))  # loadable by plain HF tokenizers
    assert hf.encode(SAMPLES[0], add_special_tokens=False).ids == bpe.encode(SAMPLES[0])
    ours = load_tokenizer_file(path)
    assert ours.encode_batch(SAMPLES) == bpe.encode_batch(SAMPLES)


def test_bpe_is_gpt2s_byte_level_bpe_trained_on_the_documents_as_they_are():
    """The MoE's bpe, written out with the `tokenizers` API: EOT first, 256 bytes, pairs seen twice, and
    the documents (a literal EOT inside one included) given to the trainer unchanged."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    # a vocabulary larger than the pairs seen twice can give, so the frequency threshold decides its end
    docs = generate_stories(40, seed=2) + [f"a document{EOT}with the token inside"]
    reference = Tokenizer(models.BPE())
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=3000,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    reference.train_from_iterator(docs, trainer=trainer)
    ours = train_bpe_tokenizer(docs, vocab_size=3000)
    assert ours.tokenizer.to_str() == reference.to_str() and ours.eot_id == 0
    assert 257 < ours.vocab_size < 3000
    assert ours.encode_batch(SAMPLES) == [reference.encode(t, add_special_tokens=False).ids for t in SAMPLES]


def test_bpe_training_is_deterministic():
    docs = generate_stories(200, seed=5)
    a = train_bpe_tokenizer(docs, vocab_size=400)
    b = train_bpe_tokenizer(docs, vocab_size=400)
    assert a.to_state() == b.to_state()


# ------------------------------------------------------------------------------------- tiktoken/gpt2


def test_tiktoken_wrapper_equals_tiktoken_and_round_trips():
    enc = tiny_tiktoken_encoding()
    tok = TiktokenTokenizer(enc, name="tiny")
    assert tok.vocab_size == enc.n_vocab == 265 and tok.eot_id == 264
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == enc.encode(text, allowed_special={EOT})
        assert tok.decode(ids) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]
    assert len(tok.encode(" the")) == 1  # the merge table is used


def test_tiktoken_state_round_trip_needs_no_files(tmp_path):
    tok = TiktokenTokenizer(tiny_tiktoken_encoding(), name="tiny")
    state = tok.to_state()
    assert json.loads(json.dumps(state)) == state
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"tokenizer": state}, ckpt)
    restored = tokenizer_from_state(torch.load(ckpt, map_location="cpu", weights_only=True)["tokenizer"])
    assert restored.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert (restored.vocab_size, restored.eot_id, restored.name) == (tok.vocab_size, tok.eot_id, "tiny")
    path = tok.save(tmp_path / "tok.json")
    assert load_tokenizer_file(path).encode(SAMPLES[5]) == tok.encode(SAMPLES[5])


def _block_network(monkeypatch):
    def no_network(blobpath):
        import requests

        raise requests.exceptions.ConnectionError(f"network blocked in tests: {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    # tiktoken keeps constructed encodings in a registry: make sure nothing is reused from it
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


def test_gpt2_offline_gives_one_line_error_naming_the_fix(monkeypatch, tmp_path):
    empty_cache = tmp_path / "tiktoken-cache"
    empty_cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty_cache))
    _block_network(monkeypatch)
    for load in (load_gpt2_tokenizer, lambda: build_tokenizer("gpt2")):
        with pytest.raises(RuntimeError) as info:
            load()
        message = str(info.value)
        assert message.startswith(GPT2_OFFLINE_ERROR)
        assert "\n" not in message
        assert "TIKTOKEN_CACHE_DIR" in message and "--tokenizer bpe" in message


def test_gpt2_from_local_cache_if_present(monkeypatch):
    """With the GPT-2 files in tiktoken's cache, check the real tokenizer; without, the clear error.

    The network is blocked either way, so this never downloads.
    """
    _block_network(monkeypatch)
    try:
        tok = load_gpt2_tokenizer()
    except RuntimeError as err:
        assert str(err).startswith(GPT2_OFFLINE_ERROR)
        return
    assert tok.name == "gpt2" and tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    restored = tokenizer_from_state(tok.to_state())
    assert restored.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)


# ------------------------------------------------------------------------------------------ errors


def test_bad_inputs_give_clear_errors(bpe, tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece': choose one of gpt2, bpe"):
        build_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="pass train_texts"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match="vocab_size .* must be an integer >= 257"):
        train_bpe_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(TypeError, match="got a single str"):
        train_bpe_tokenizer("a whole corpus as one string", vocab_size=300)
    with pytest.raises(ValueError, match="no text"):
        train_bpe_tokenizer([], vocab_size=300)
    with pytest.raises(ValueError, match="more than this trainer supports"):  # the Rust trainer would abort
        train_bpe_tokenizer(["some text"], vocab_size=10**9)
    with pytest.raises(ValueError, match="exceeds what 9 bytes of training text can give"):
        train_bpe_tokenizer(["some text"], vocab_size=400)
    with pytest.raises(ValueError, match=r"token id 600 is outside the bpe vocabulary \[0, 600\)"):
        bpe.decode([1, 2, 600])
    with pytest.raises(ValueError, match="outside"):
        bpe.decode([-1])
    assert bpe.decode(torch.tensor(bpe.encode("a tensor"))) == "a tensor"
    with pytest.raises(TypeError, match="encode expects a str"):
        bpe.encode(b"bytes")
    with pytest.raises(TypeError, match="use encode"):
        bpe.encode_batch("not a list")
    with pytest.raises(ValueError, match="not a tokenizer state"):
        tokenizer_from_state({"vocab": {}})
    with pytest.raises(ValueError, match="not valid JSON"):
        tokenizer_from_state("{broken")
    with pytest.raises(ValueError, match="version 99 is not supported"):
        tokenizer_from_state({**bpe.to_state(), "version": 99})
    with pytest.raises(ValueError, match="missing the field 'tokenizer_json'"):
        tokenizer_from_state({k: v for k, v in bpe.to_state().items() if k != "tokenizer_json"})
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match="cannot read the tokenizer file"):
        load_tokenizer_file(bad)
