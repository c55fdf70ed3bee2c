"""The figures the documents quote about the reference model are the ones the code computes.

A number written by hand in three documents drifts (it once read 158.6M, 158.8M and 19.4M at the
same time). Every "NNN.NNM parameters" / "NN.NNM active" figure in the repository's Markdown files and
in train.py's docstring must equal count_parameters / count_active_parameters of the t1000 preset."""

import re
from pathlib import Path

from sparse_moe_transformer.src.param_counts import count_active_parameters, count_parameters
from sparse_moe_transformer.src.train import preset_config

ROOT = Path(__file__).resolve().parents[2]
T1000 = preset_config("t1000")
TOTAL, ACTIVE = count_parameters(T1000), count_active_parameters(T1000)
DOCS = [*ROOT.glob("*.md"), *ROOT.glob("*/README.md"), *ROOT.glob("*/BENCHMARKS.md"),
        ROOT / "sparse_moe_transformer" / "src" / "train.py"]  # fmt: skip
# "158.77M parameters", "158.77M / 18.97M", "18.97M active", "158,771,296"
TOTAL_RE = re.compile(r"\b(15\d\.\d+)\s?M(?= parameters| /|\b)")
ACTIVE_RE = re.compile(r"(?:/ |\b)(1\d\.\d+)\s?M(?= active| \|)")


def test_the_reference_counts():
    assert (TOTAL, ACTIVE) == (158_771_296, 18_967_648)


def test_every_document_quotes_the_computed_parameter_counts():
    seen = 0
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in TOTAL_RE.finditer(text):
            value = float(match.group(1))
            digits = len(match.group(1).split(".")[1])
            assert value == round(TOTAL / 1e6, digits), f"{path.name}: {match.group(0)} != {TOTAL:,}"
            seen += 1
        for match in ACTIVE_RE.finditer(text):
            value = float(match.group(1))
            digits = len(match.group(1).split(".")[1])
            assert value == round(ACTIVE / 1e6, digits), f"{path.name}: {match.group(0)} != {ACTIVE:,}"
            seen += 1
    assert seen >= 5  # README, the MoE README's table and memory plan, train.py's docstring
