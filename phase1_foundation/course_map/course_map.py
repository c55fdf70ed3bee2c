"""The course map: which lesson builds on which, read from the notebooks themselves.

Every notebook `phaseN_*/notebooks/N.M_name.ipynb` opens with a Markdown cell holding the line
`**Prerequisites:**` followed by links to the notebooks it builds on, and closes with a cell holding
`**Next:**` and a link to the notebook after it. This script reads those links, and draws them:

    python phase1_foundation/course_map/course_map.py    # writes course_map.dot and course_map.svg next to
                                                         # itself (needs `dot`)

`phase1_foundation/tests/test_course_map.py` rebuilds the graph from the notebooks and fails when the
committed drawing, the links or the imports disagree with it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
WHERE = "phase1_foundation/course_map/course_map"  # the committed drawing, without its suffix
PHASES = {
    "phase1_foundation": "Phase 1 · Foundation",
    "phase2_architecture": "Phase 2 · Architecture",
    "phase3_components": "Phase 3 · Components",
    "phase4_training": "Phase 4 · Training",
    "phase5_production": "Phase 5 · Production",
}
FINAL_NEXT = "sparse_moe_transformer/README.md"  # where the last lesson's "Next" leads
NOTEBOOK_NAME = re.compile(r"^(\d+)\.(\d+)_([a-z0-9_]+)\.ipynb$")
LINK = re.compile(r"\]\(([^)\s]+)\)")

# The lesson that teaches each course module. A notebook that imports one of these modules must be that
# lesson or have it among its (transitive) prerequisites; the test checks it, and checks that each
# teaching lesson imports its module. Modules not listed (corpora, demo models) are tools, not lessons.
TEACHES = {
    "phase1_foundation.src.backprop_from_scratch": "1.1",
    "phase1_foundation.src.autograd_engine": "1.2",
    "phase1_foundation.src.primitives": "1.4",
    "phase1_foundation.src.attention_mechanism": "1.5",
    "phase2_architecture.src.positional_encoding": "2.1",
    "phase2_architecture.src.norms": "2.1",
    "phase2_architecture.src.transformer_blocks": "2.1",
    "phase2_architecture.src.encoder_decoder": "2.2",
    "phase2_architecture.src.gpt": "2.3",
    "phase2_architecture.src.training_utils": "2.3",
    "phase2_architecture.src.tiled_attention": "2.4",
    "phase2_architecture.src.feed_forward": "2.5",
    "phase2_architecture.src.mixture_of_experts": "2.6",
    "phase3_components.src.bpe_tokenizer": "3.1",
    "phase3_components.src.char_tokenizer": "3.1",
    "phase3_components.src.text_data": "3.2",
    "phase3_components.src.optimizers": "3.3",
    "phase3_components.src.lr_schedules": "3.3",
    "phase3_components.src.gradient_clipping": "3.3",
    "phase3_components.src.muon": "3.4",
    "phase4_training.src.training_loop": "4.1",
    "phase4_training.src.lora": "4.2",
    "phase4_training.src.gpt2_weights": "4.3",
    "phase4_training.src.classification_finetune": "4.4",
    "phase4_training.src.instruction_finetune": "4.5",
    "phase4_training.src.reward_model": "4.6",
    "phase4_training.src.dpo": "4.6",
    "phase4_training.src.ppo_rlhf": "4.6",
    "phase5_production.src.sampling": "5.1",
    "phase5_production.src.kv_cache": "5.2",
    "phase5_production.src.quantization": "5.3",
    "phase5_production.src.speculative_decoding": "5.4",
    "phase5_production.src.multiple_choice_eval": "5.5",
    "phase5_production.src.batching": "5.6",
    "phase5_production.src.server": "5.6",
}


def lesson_id(path: Path) -> str:
    """'2.4' for phase2_architecture/notebooks/2.4_attention_variants.ipynb."""
    match = NOTEBOOK_NAME.match(path.name)
    if match is None:
        raise ValueError(f"{path}: a course notebook is named N.M_name.ipynb (N = phase, M = its place)")
    return f"{match.group(1)}.{match.group(2)}"


def lesson_label(path: Path) -> str:
    """'2.4 attention variants'."""
    return f"{lesson_id(path)} {NOTEBOOK_NAME.match(path.name).group(3).replace('_', ' ')}"


def course_notebooks() -> list[Path]:
    """Every course notebook, in reading order (phase, then number)."""
    found = [p for phase in PHASES for p in (REPO_ROOT / phase / "notebooks").glob("*.ipynb")]
    return sorted(found, key=lambda p: tuple(int(x) for x in lesson_id(p).split(".")))


def _markdown_line(cell_source: str, marker: str) -> str | None:
    lines = [line for line in cell_source.splitlines() if marker in line]
    return lines[0] if lines else None


def _resolve(notebook: Path, target: str) -> Path:
    return (notebook.parent / target).resolve()


def navigation(path: Path) -> tuple[list[Path], Path | None]:
    """(prerequisites, next) linked from the notebook's first and last cells.

    Raises ValueError when the first cell has no '**Prerequisites:**' line or the last cell no '**Next:**'.
    """
    cells = nbformat.read(path, as_version=4).cells
    first = (
        _markdown_line(cells[0].source, "**Prerequisites:**") if cells[0].cell_type == "markdown" else None
    )
    last = _markdown_line(cells[-1].source, "**Next:**") if cells[-1].cell_type == "markdown" else None
    if first is None:
        raise ValueError(f"{path.name}: the first cell must be Markdown with a '**Prerequisites:**' line")
    if last is None:
        raise ValueError(f"{path.name}: the last cell must be Markdown with a '**Next:**' line")
    prerequisites = [_resolve(path, t) for t in LINK.findall(first.split("**Prerequisites:**", 1)[1])]
    next_links = [_resolve(path, t) for t in LINK.findall(last.split("**Next:**", 1)[1])]
    return prerequisites, (next_links[0] if next_links else None)


def prerequisite_graph() -> dict[str, list[str]]:
    """{lesson id: [ids of its direct prerequisites]}, from the notebooks' links."""
    ids = {p.resolve(): lesson_id(p) for p in course_notebooks()}
    graph = {}
    for path in course_notebooks():
        prerequisites, _ = navigation(path)
        missing = [str(p) for p in prerequisites if p not in ids]
        if missing:
            raise ValueError(f"{path.name}: prerequisite links to no course notebook: {missing}")
        graph[lesson_id(path)] = [ids[p] for p in prerequisites]
    return graph


def dot_source() -> str:
    """The map as DOT: one cluster per phase, lessons in reading order, an edge per prerequisite."""
    notebooks = course_notebooks()
    graph = prerequisite_graph()
    lines = [
        "digraph course_map {",
        '  graph [rankdir=LR, fontname="Helvetica", fontsize=12, nodesep=0.25, ranksep=0.45];',
        '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica", fontsize=10];',
        '  edge [color="#5a6b85", arrowsize=0.6];',
    ]
    for phase, title in PHASES.items():
        lines.append(f'  subgraph "cluster_{phase}" {{')
        lines.append(f'    label="{title}"; style="rounded"; color="#9aa7bd";')
        for path in notebooks:
            if path.parts[-3] == phase:
                lines.append(f'    "{lesson_id(path)}" [label="{lesson_label(path)}"];')
        lines.append("  }")
    for lesson, prerequisites in graph.items():
        for before in prerequisites:
            lines.append(f'  "{before}" -> "{lesson}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def svg_edges(svg_text: str) -> set[tuple[str, str]]:
    """The edges drawn in an SVG rendered by graphviz (its <title>a&#45;&gt;b</title> elements)."""
    titles = re.findall(r'<g id="edge\d+" class="edge">\s*<title>(.*?)</title>', svg_text)
    return {tuple(t.replace("&#45;", "-").replace("&gt;", ">").split("->")) for t in titles}


def main() -> None:
    source = dot_source()
    (OUT / "course_map.dot").write_text(source, encoding="utf-8")
    if shutil.which("dot") is None:
        sys.exit(f"wrote {WHERE}.dot; rendering needs graphviz's `dot` (apt-get install graphviz)")
    svg = subprocess.run(["dot", "-Tsvg"], input=source, capture_output=True, text=True, check=True).stdout
    (OUT / "course_map.svg").write_text(svg, encoding="utf-8")
    print(f"wrote {WHERE}.dot and {WHERE}.svg ({len(prerequisite_graph())} lessons)")


if __name__ == "__main__":
    main()
