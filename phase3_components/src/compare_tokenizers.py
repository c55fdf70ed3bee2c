"""Compare our byte-level BPE with Hugging Face `tokenizers` (Rust) trained on the same text.

    python phase3_components/src/compare_tokenizers.py                       # synthetic stories
    python phase3_components/src/compare_tokenizers.py --text ../shared/data/tinystories/train.txt \
        --max-chars 2000000 --vocab-size 2048

Prints, for both tokenizers: training time, encoding time and throughput, compression (UTF-8
bytes per token on held-out text, higher = shorter sequences), how many of the learned merges
agree, and whether encode -> decode round-trips. Both use the GPT-2 pre-tokenisation regex and a
256-byte base alphabet, so the merges agree except where two pairs tie in frequency (we take the
smallest byte ids, HF the smallest ids of its own alphabet order). HF's side is trained by
`hf_byte_level_bpe.train_hf_byte_level_bpe`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tokenizers import Tokenizer

from phase3_components.src.bpe_tokenizer import N_BYTES, BPETokenizer
from phase3_components.src.hf_byte_level_bpe import train_hf_byte_level_bpe


def hf_merged_tokens(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes of every token HF learned by merging, in merge order."""
    byte_decoder = {ch: b for b, ch in _bytes_to_unicode().items()}  # 'Ġ' -> 32, ...
    model = tokenizer.get_vocab()
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    learned = sorted((i, t) for t, i in model.items() if t not in specials and len(t) > 1)
    return [bytes(byte_decoder[ch] for ch in t) for _, t in learned]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (space -> 'Ġ'), used by HF's ByteLevel vocab."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def ours_merged_tokens(tokenizer: BPETokenizer) -> list[bytes]:
    return [tokenizer.vocab[N_BYTES + k] for k in range(len(tokenizer.merges))]


def bytes_per_token(n_tokens: int, text: str) -> float:
    """Compression: UTF-8 bytes of the text divided by the number of tokens it became."""
    if n_tokens == 0:
        raise ValueError("no tokens: cannot compute a compression ratio of empty text")
    return len(text.encode("utf-8")) / n_tokens


def compare(train_text: str, test_text: str, vocab_size: int) -> dict:
    """Train both tokenizers on train_text and measure them on test_text; returns the numbers."""
    t0 = time.perf_counter()
    ours = BPETokenizer.train(train_text, vocab_size)
    t1 = time.perf_counter()
    hf = train_hf_byte_level_bpe(train_text, vocab_size)
    t2 = time.perf_counter()
    ours_ids = ours.encode(test_text)
    t3 = time.perf_counter()
    hf_ids = hf.encode(test_text).ids
    t4 = time.perf_counter()
    ours_tokens, hf_tokens = ours_merged_tokens(ours), hf_merged_tokens(hf)
    return {
        "train_s": (t1 - t0, t2 - t1),
        "encode_s": (t3 - t2, t4 - t3),
        "bytes_per_token": (
            bytes_per_token(len(ours_ids), test_text),
            bytes_per_token(len(hf_ids), test_text),
        ),
        "same_merge_order": sum(a == b for a, b in zip(ours_tokens, hf_tokens)),
        "shared_tokens": len(set(ours_tokens) & set(hf_tokens)),
        "n_merges": (len(ours_tokens), len(hf_tokens)),
        "round_trip": (ours.decode(ours_ids) == test_text, hf.decode(hf_ids) == test_text),
        "test_mb": len(test_text.encode("utf-8")) / 1e6,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, help="a UTF-8 text file (default: 2,000 synthetic stories)")
    parser.add_argument("--max-chars", type=int, default=1_000_000, help="use at most this many characters")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--test-fraction", type=float, default=0.1, help="held-out tail used for measuring")
    args = parser.parse_args(argv)
    if args.text is not None:
        if not args.text.is_file():
            parser.error(f"--text {args.text} does not exist: give a path to a UTF-8 text file")
        text = args.text.read_text(encoding="utf-8")[: args.max_chars]
    else:
        from phase3_components.src.synthetic_stories import generate_stories

        text = "\n\n".join(generate_stories(2000, seed=0))[: args.max_chars]
    if not 0 < args.test_fraction < 1:
        parser.error("--test-fraction must be in (0, 1)")
    cut = int(len(text) * (1 - args.test_fraction))
    r = compare(text[:cut], text[cut:], args.vocab_size)
    print(f"train on {cut:,} chars, test on {len(text) - cut:,} chars, vocab_size={args.vocab_size}")
    print(f"{'':24}{'ours (Python)':>16}{'HF tokenizers':>16}")
    print(f"{'train time (s)':24}{r['train_s'][0]:16.3f}{r['train_s'][1]:16.3f}")
    print(f"{'encode time (s)':24}{r['encode_s'][0]:16.3f}{r['encode_s'][1]:16.3f}")
    mbps = [r["test_mb"] / max(s, 1e-9) for s in r["encode_s"]]
    print(f"{'encode MB/s':24}{mbps[0]:16.2f}{mbps[1]:16.2f}")
    print(f"{'bytes per token':24}{r['bytes_per_token'][0]:16.3f}{r['bytes_per_token'][1]:16.3f}")
    print(f"{'round trip exact':24}{r['round_trip'][0]!s:>16}{r['round_trip'][1]!s:>16}")
    n = min(r["n_merges"])
    print(f"merges in the same position: {r['same_merge_order']}/{n}")
    print(f"tokens learned by both:      {r['shared_tokens']}/{n}")


if __name__ == "__main__":
    main()
