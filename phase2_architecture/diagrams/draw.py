"""The course's conceptual diagrams, drawn with graphviz.

    python phase2_architecture/diagrams/draw.py    # writes NAME.dot and NAME.svg for each diagram into
                                                   # the diagrams/ folder of the phase that teaches it
                                                   # (needs `dot`)

Each diagram is a DOT source below, written so that every edge sits on its own line (`a -> b`); the
READMEs show the SVGs, and `phase2_architecture/tests/test_course_diagrams.py` checks that the committed
files are what this script draws.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The folder of the phase that teaches each diagram: its README and notebooks show it from there.
FOLDERS = {
    "transformer_block": "phase2_architecture",
    "gpt": "phase2_architecture",
    "encoder_decoder": "phase2_architecture",
    "moe_dispatch": "phase2_architecture",
    "kv_cache": "phase5_production",
    "lora": "phase4_training",
    "parallelism": "sparse_moe_transformer",
}
STYLE = """  graph [fontname="Helvetica", fontsize=11, nodesep=0.3, ranksep=0.35];
  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica", fontsize=10];
  edge [color="#5a6b85", arrowsize=0.6, fontname="Helvetica", fontsize=9];"""

DIAGRAMS = {
    "transformer_block": """digraph transformer_block {
  label="A pre-norm transformer block (phase2_architecture/src/transformer_blocks.py)"; labelloc=t;
  rankdir=TB;
STYLE
  x [label="x  [B, T, C]", shape=plaintext, style=""];
  ln1 [label="LayerNorm / RMSNorm"];
  attn [label="multi-head causal self-attention\\n(Phase 1; RoPE and GQA optional)", fillcolor="#fde9d9"];
  add1 [label="+", shape=circle, fillcolor="white"];
  ln2 [label="LayerNorm / RMSNorm"];
  ffn [label="feed-forward: GELU MLP or SwiGLU\\n(or a mixture of experts)", fillcolor="#e2f0d9"];
  add2 [label="+", shape=circle, fillcolor="white"];
  y [label="out  [B, T, C]", shape=plaintext, style=""];
  x -> ln1
  ln1 -> attn
  attn -> add1
  x -> add1 [label="residual", style=dashed]
  add1 -> ln2
  ln2 -> ffn
  ffn -> add2
  add1 -> add2 [label="residual", style=dashed]
  add2 -> y
}
""",
    "gpt": """digraph gpt {
  label="The decoder-only GPT (phase2_architecture/src/gpt.py)"; labelloc=t;
  rankdir=TB;
STYLE
  ids [label="token ids  [B, T]", shape=plaintext, style=""];
  tok [label="token embedding\\n[V, C]"];
  pos [label="position embedding [T, C]\\n(learned; none with RoPE)"];
  sum [label="+", shape=circle, fillcolor="white"];
  blocks [label="N transformer blocks\\n(causal: position t sees only 0..t)", fillcolor="#fde9d9"];
  lnf [label="final norm"];
  head [label="LM head [C, V]\\n(optionally tied to the token embedding)"];
  logits [label="logits  [B, T, V]", shape=plaintext, style=""];
  loss [label="cross-entropy with the next token\\n(or sampling when generating)", fillcolor="#e2f0d9"];
  ids -> tok
  tok -> sum
  pos -> sum
  sum -> blocks
  blocks -> lnf
  lnf -> head
  head -> logits
  logits -> loss
}
""",
    "encoder_decoder": """digraph encoder_decoder {
  label="The 2017 encoder-decoder (phase2_architecture/src/encoder_decoder.py)"; labelloc=t;
  rankdir=TB;
STYLE
  src [label="source ids", shape=plaintext, style=""];
  tgt [label="target ids so far (shifted right)", shape=plaintext, style=""];
  semb [label="embedding + sinusoidal positions"];
  temb [label="embedding + sinusoidal positions"];
  enc [label="N encoder blocks\\nbidirectional self-attention, FFN", fillcolor="#fde9d9"];
  mem [label="memory  [B, S, C]", shape=plaintext, style=""];
  dself [label="causal self-attention", fillcolor="#fde9d9"];
  dcross [label="cross-attention\\nqueries: decoder; keys, values: memory", fillcolor="#fff2cc"];
  dffn [label="FFN  (x N decoder blocks)", fillcolor="#e2f0d9"];
  out [label="linear -> logits of the next target token", shape=plaintext, style=""];
  src -> semb
  semb -> enc
  enc -> mem
  tgt -> temb
  temb -> dself
  dself -> dcross
  mem -> dcross
  dcross -> dffn
  dffn -> out
}
""",
    "moe_dispatch": """digraph moe_dispatch {
  label="The sparse MoE layer: route -> sort -> expert -> scatter (phase2 mixture_of_experts.moe_ffn_sorted)";
  labelloc=t;
  rankdir=LR;
STYLE
  x [label="tokens x\\n[N, C]", shape=plaintext, style=""];
  router [label="route\\ngate logits [N, E]\\ntop-k experts, softmax over the k"];
  pairs [label="N*k (token, slot) pairs\\nexpert id, gate weight"];
  sort [label="sort the pairs by expert\\n(one argsort; counts per expert)", fillcolor="#fff2cc"];
  gather [label="gather the rows of x\\ncontiguous per expert"];
  experts [label="expert e: its rows only\\nFFN_e(x_rows)  for e = 0..E-1", fillcolor="#e2f0d9"];
  scatter [label="scatter back\\nout[token] += weight * FFN_e(x)", fillcolor="#fde9d9"];
  y [label="out\\n[N, C]", shape=plaintext, style=""];
  aux [label="load-balancing loss\\nand router z-loss", shape=note, fillcolor="white"];
  x -> router
  router -> pairs
  pairs -> sort
  sort -> gather
  x -> gather
  gather -> experts
  experts -> scatter
  scatter -> y
  router -> aux
}
""",
    "kv_cache": """digraph kv_cache {
  label="Generation with a KV cache: one new token per step (phase5_production/src/kv_cache.py)"; labelloc=t;
  rankdir=LR;
STYLE
  tok [label="new token at position t", shape=plaintext, style=""];
  qkv [label="q_t, k_t, v_t\\n[B, H, 1, Dh]"];
  cache [label="cache of layer l\\nkeys, values  [B, H_kv, t, Dh]", fillcolor="#fff2cc"];
  append [label="append k_t, v_t\\n-> [B, H_kv, t+1, Dh]"];
  attn [label="attention of q_t over\\nall t+1 keys (no mask needed)", fillcolor="#fde9d9"];
  next [label="next layer ... logits -> sample token t+1", shape=plaintext, style=""];
  tok -> qkv
  qkv -> append
  cache -> append
  append -> cache [label="stored for step t+1", style=dashed]
  append -> attn
  qkv -> attn [label="q_t"]
  attn -> next
}
""",
    "lora": """digraph lora {
  label="LoRA: a frozen weight plus a trained low-rank update (phase4_training/src/lora.py)"; labelloc=t;
  rankdir=LR;
STYLE
  x [label="x  [.., d_in]", shape=plaintext, style=""];
  w0 [label="W0  [d_out, d_in]\\nfrozen (pretrained)", fillcolor="#dddddd"];
  a [label="A  [r, d_in]\\ntrained, random init", fillcolor="#e2f0d9"];
  b [label="B  [d_out, r]\\ntrained, zero init", fillcolor="#e2f0d9"];
  scale [label="x alpha / r"];
  add [label="+", shape=circle, fillcolor="white"];
  h [label="h = W0 x + (alpha/r) B A x\\nmerge: W = W0 + (alpha/r) B A", shape=plaintext, style=""];
  x -> w0
  x -> a
  a -> b
  b -> scale
  w0 -> add
  scale -> add
  add -> h
}
""",
    "parallelism": """digraph parallelism {
  label="Data parallelism (the MoE under torchrun: DDP) vs expert parallelism (not implemented here)";
  labelloc=t;
  rankdir=TB;
STYLE
  subgraph cluster_data {
    label="data parallel: every GPU holds the whole model"; style=rounded; color="#9aa7bd";
    d_batch0 [label="batch shard 0", shape=plaintext, style=""];
    d_batch1 [label="batch shard 1", shape=plaintext, style=""];
    d_gpu0 [label="GPU 0: all layers,\\nall E experts"];
    d_gpu1 [label="GPU 1: all layers,\\nall E experts"];
    d_reduce [label="all-reduce (average)\\nof the gradients", fillcolor="#fff2cc"];
  }
  subgraph cluster_expert {
    label="expert parallel: each GPU holds some experts"; style=rounded; color="#9aa7bd";
    e_tokens0 [label="tokens on GPU 0", shape=plaintext, style=""];
    e_tokens1 [label="tokens on GPU 1", shape=plaintext, style=""];
    e_a2a [label="all-to-all: send each token\\nto the GPU of its expert", fillcolor="#fff2cc"];
    e_gpu0 [label="GPU 0: experts 0 .. E/2-1"];
    e_gpu1 [label="GPU 1: experts E/2 .. E-1"];
    e_back [label="all-to-all back\\nto the token's GPU", fillcolor="#fff2cc"];
  }
  d_batch0 -> d_gpu0
  d_batch1 -> d_gpu1
  d_gpu0 -> d_reduce
  d_gpu1 -> d_reduce
  e_tokens0 -> e_a2a
  e_tokens1 -> e_a2a
  e_a2a -> e_gpu0
  e_a2a -> e_gpu1
  e_gpu0 -> e_back
  e_gpu1 -> e_back
}
""",
}

EDGE = re.compile(r"^\s*(\w+) -> (\w+)", re.MULTILINE)


def out_dir(name: str) -> Path:
    """Where diagram `name`'s .dot and .svg are committed."""
    return REPO_ROOT / FOLDERS[name] / "diagrams"


def dot_source(name: str) -> str:
    return DIAGRAMS[name].replace("STYLE", STYLE)


def dot_edges(source: str) -> set[tuple[str, str]]:
    """The edges of a DOT source written one per line (`a -> b`)."""
    return set(EDGE.findall(source))


def svg_edges(svg_text: str) -> set[tuple[str, str]]:
    """The edges drawn in an SVG rendered by graphviz (its <title>a&#45;&gt;b</title> elements)."""
    titles = re.findall(r'<g id="edge\d+" class="edge">\s*<title>(.*?)</title>', svg_text)
    return {tuple(t.replace("&#45;", "-").replace("&gt;", ">").split("->")) for t in titles}


def main() -> None:
    if shutil.which("dot") is None:
        sys.exit("rendering needs graphviz's `dot` (apt-get install graphviz / brew install graphviz)")
    for name in DIAGRAMS:
        source = dot_source(name)
        out = out_dir(name)
        out.mkdir(exist_ok=True)
        (out / f"{name}.dot").write_text(source, encoding="utf-8")
        svg = subprocess.run(
            ["dot", "-Tsvg"], input=source, capture_output=True, text=True, check=True
        ).stdout
        (out / f"{name}.svg").write_text(svg, encoding="utf-8")
        print(f"wrote {(out / name).relative_to(REPO_ROOT)}.svg")


if __name__ == "__main__":
    main()
