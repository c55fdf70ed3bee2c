"""The scalar autograd engine gives PyTorch's values and gradients; its graphs draw with or without `dot`."""

import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phase1_foundation.src.autograd_engine import (
    MLP,
    XOR_INPUTS,
    XOR_TARGETS,
    Value,
    draw_graph,
    graph_svg,
    mse,
    save_graph,
    train_mlp,
)

# Operations written so that they run unchanged on a Value and on a float64 torch scalar.
# Arguments are kept in safe domains (positive log/pow bases, denominators away from 0).
UNARY_OPS = [
    lambda a: a.tanh(),
    lambda a: a.tanh().exp(),
    lambda a: a.relu(),
    lambda a: (a * a + 1).log(),
    lambda a: -a,
    lambda a: a**2,
    lambda a: a**3,
    lambda a: (a * a + 0.1) ** 0.5,
    lambda a: (a * a + 0.5) ** -1.5,
    lambda a: 2.0 - a,  # __rsub__
    lambda a: 3.0 * a,  # __rmul__
    lambda a: 1.5 + a,  # __radd__
    lambda a: 1.0 / (a * a + 0.5),  # __rtruediv__
    lambda a: a / 4.0,  # __truediv__ by a number
    lambda a: a - 0.25,  # __sub__ a number
]
BINARY_OPS = [
    lambda a, b: a + b,
    lambda a, b: a - b,
    lambda a, b: a * b,
    lambda a, b: a / (b * b + 0.5),
]


def random_program(seed, n_leaves=4, n_ops=25):
    """A random sequence of operations over a growing pool of intermediate results."""
    rng = random.Random(seed)
    leaves = [rng.uniform(-2, 2) for _ in range(n_leaves)]
    steps = []
    for i in range(n_ops):
        pool = n_leaves + i
        if rng.random() < 0.5:
            steps.append((rng.randrange(len(UNARY_OPS)), rng.randrange(pool), None))
        else:
            steps.append((rng.randrange(len(BINARY_OPS)), rng.randrange(pool), rng.randrange(pool)))
    return leaves, steps


def run_program(leaves, steps, make_leaf):
    nodes = [make_leaf(x) for x in leaves]
    for op, i, j in steps:
        out = UNARY_OPS[op](nodes[i]) if j is None else BINARY_OPS[op](nodes[i], nodes[j])
        too_big = abs(float(out.data)) > 1e3  # .data: the float (Value) or a detached tensor (torch)
        nodes.append(out.tanh() * 10 if too_big else out)  # keep magnitudes tame
    result = nodes[len(leaves)]
    for node in nodes[len(leaves) + 1 :]:
        result = result + node  # every intermediate result reaches the output
    return nodes[: len(leaves)], result


@pytest.mark.parametrize("seed", range(8))
def test_random_expressions_match_torch(seed):
    leaves, steps = random_program(seed)
    ours_leaves, ours = run_program(leaves, steps, Value)
    ours.backward()
    t_leaves, theirs = run_program(
        leaves, steps, lambda x: torch.tensor(x, dtype=torch.float64, requires_grad=True)
    )
    theirs.backward()
    assert ours.data == pytest.approx(theirs.item(), rel=1e-12, abs=1e-12)
    for v, t in zip(ours_leaves, t_leaves):
        assert v.grad == pytest.approx(t.grad.item(), rel=1e-9, abs=1e-12)


def test_every_operation_matches_torch_individually():
    x0, y0 = 0.7, -1.3
    for k, op in enumerate(UNARY_OPS):
        v, t = Value(x0), torch.tensor(x0, dtype=torch.float64, requires_grad=True)
        out_v, out_t = op(v), op(t)
        out_v.backward()
        out_t.backward()
        assert out_v.data == pytest.approx(out_t.item(), rel=1e-12), f"unary op {k}"
        assert v.grad == pytest.approx(t.grad.item(), rel=1e-12), f"unary op {k}"
    for k, op in enumerate(BINARY_OPS):
        a, b = Value(x0), Value(y0)
        ta, tb = (torch.tensor(z, dtype=torch.float64, requires_grad=True) for z in (x0, y0))
        out_v, out_t = op(a, b), op(ta, tb)
        out_v.backward()
        out_t.backward()
        assert out_v.data == pytest.approx(out_t.item(), rel=1e-12), f"binary op {k}"
        assert (a.grad, b.grad) == pytest.approx((ta.grad.item(), tb.grad.item()), rel=1e-12), f"binary {k}"


def test_relu_gradient_is_zero_for_negative_inputs():
    a, b = Value(-2.0), Value(3.0)
    (a.relu() + b.relu()).backward()
    assert (a.grad, b.grad) == (0.0, 1.0)


def test_gradients_accumulate_over_repeated_use():
    a = Value(3.0)
    b = a * a + a  # db/da = 2a + 1 = 7
    b.backward()
    assert a.grad == 7.0
    c = Value(-4.0)
    d = c + c  # the same Value twice in one op
    d.backward()
    assert c.grad == 2.0


def test_long_chain_does_not_hit_recursion_limit():
    x = Value(0.001)
    total = Value(0.0)
    for _ in range(5000):
        total = total + x
    total.backward()
    assert x.grad == 5000.0


def test_mlp_matches_torch():
    model = MLP(3, [4, 4, 2], seed=1)
    rng = random.Random(2)
    inputs = [[rng.uniform(-1, 1) for _ in range(3)] for _ in range(5)]
    targets = [[rng.uniform(-1, 1) for _ in range(2)] for _ in range(5)]
    loss = mse([model(x) for x in inputs], targets)
    model.zero_grad()
    loss.backward()
    # the same network in torch, weights copied neuron by neuron
    weights, biases = [], []
    for layer in model.layers:
        w = torch.tensor([[wi.data for wi in n.w] for n in layer.neurons], dtype=torch.float64)
        b = torch.tensor([n.b.data for n in layer.neurons], dtype=torch.float64)
        weights.append(w.requires_grad_(True))
        biases.append(b.requires_grad_(True))
    h = torch.tensor(inputs, dtype=torch.float64)
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w.T + b
        if i < len(weights) - 1:
            h = torch.tanh(h)
    t_loss = torch.nn.functional.mse_loss(h, torch.tensor(targets, dtype=torch.float64))
    t_loss.backward()
    assert loss.data == pytest.approx(t_loss.item(), rel=1e-12)
    for layer, w, b in zip(model.layers, weights, biases):
        for r, neuron in enumerate(layer.neurons):
            assert [wi.grad for wi in neuron.w] == pytest.approx(w.grad[r].tolist(), rel=1e-9, abs=1e-14)
            assert neuron.b.grad == pytest.approx(b.grad[r].item(), rel=1e-9, abs=1e-14)
    assert len(model.parameters()) == (3 * 4 + 4) + (4 * 4 + 4) + (4 * 2 + 2)


def test_mlp_learns_xor():
    model = MLP(2, [4, 1], seed=0)
    losses = train_mlp(model, XOR_INPUTS, XOR_TARGETS, steps=300, lr=0.1, print_every=None)
    assert losses[0] > 0.2 and losses[-1] < 1e-2
    predictions = [round(model(x)[0].data) for x in XOR_INPUTS]
    assert predictions == [t[0] for t in XOR_TARGETS]


def small_expression():
    a, b, c, f = Value(2.0, label="a"), Value(-3.0, label="b"), Value(10.0, label="c"), Value(-2.0, label="f")
    e = a * b
    e.label = "e"
    d = e + c
    d.label = "d"
    L = d * f
    L.label = "L"
    L.backward()
    return L


def test_draw_graph_has_one_node_per_value_and_op():
    L = small_expression()
    source = draw_graph(L).source
    lines = [line for line in source.splitlines() if "[" in line or "->" in line]
    nodes = [line for line in lines if "->" not in line and "label=" in line]
    edges = [line for line in lines if "->" in line]
    assert len(nodes) == 7 + 3  # values a, b, c, e, d, f, L and the ops *, +, *
    assert len(edges) == 3 + 6  # op -> result, and two inputs -> op for each op
    assert sum("shape=circle" in n for n in nodes) == 3
    assert re.search(r"L \| data -8\.0000 \| grad 1\.0000", source)  # L = (2*-3 + 10) * -2
    assert re.search(r"a \| data 2\.0000 \| grad 6\.0000", source)  # dL/da = b * f = 6
    assert re.search(r"f \| data -2\.0000 \| grad 4\.0000", source)  # dL/df = d = 4


def test_save_graph_renders_with_dot(tmp_path, capsys):
    path = save_graph(draw_graph(small_expression()), tmp_path / "graph")
    if shutil.which("dot"):  # the documented set-up installs graphviz: a real SVG
        assert path == tmp_path / "graph.svg"
        assert "<svg" in path.read_text()
        assert "<svg" in graph_svg(draw_graph(small_expression()))
    else:  # no `dot` on this machine: the fallback must have happened
        assert path.suffix == ".dot" and "apt-get install graphviz" in capsys.readouterr().out


def test_fallback_without_dot_returns_source_and_says_how_to_render(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `dot` anywhere
    graph = draw_graph(small_expression())
    path = save_graph(graph, tmp_path / "graph")
    assert path == tmp_path / "graph.dot"
    assert path.read_text() == graph.source
    assert not (tmp_path / "graph.svg").exists()
    out = capsys.readouterr().out
    assert "apt-get install graphviz" in out and "brew install graphviz" in out
    assert graph_svg(graph) is None
    out = capsys.readouterr().out
    assert "digraph" in out and "apt-get install graphviz" in out


def test_bad_input_raises_clear_errors():
    with pytest.raises(TypeError, match="real number"):
        Value("3")
    with pytest.raises(TypeError, match="plain int/float exponent"):
        Value(2.0) ** Value(3.0)
    with pytest.raises(ValueError, match="log needs a positive argument"):
        Value(-1.0).log()
    with pytest.raises(ZeroDivisionError):
        Value(1.0) / 0.0
    with pytest.raises(ValueError, match="takes 2 inputs"):
        MLP(2, [3, 1], seed=0)([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="needs a Value"):
        draw_graph(3.0)


def test_script_trains_xor_and_writes_a_graph(tmp_path):
    script = Path(__file__).resolve().parents[1] / "src" / "autograd_engine.py"
    out = tmp_path / "neuron_graph"
    result = subprocess.run(
        [sys.executable, str(script), "--graph-out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Step 299, Loss: " in result.stdout
    written = list(tmp_path.iterdir())
    assert len(written) == 1 and written[0].suffix in (".svg", ".dot")  # .dot only without graphviz's dot
    assert str(written[0]) in result.stdout
