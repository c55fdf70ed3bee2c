"""A scalar reverse-mode autograd engine (in the spirit of karpathy's micrograd), drawn with graphviz.

Every number is a `Value` that remembers how it was made: its inputs (`_prev`) and the operation
(`_op`). Together these form a directed acyclic graph from the inputs to the final output (the
loss). `backward()` walks that graph from the output back to the inputs in reverse topological
order and applies the chain rule at every node:

    out = f(a, b)    =>    a.grad += ∂out/∂a · out.grad,   b.grad += ∂out/∂b · out.grad

Gradients *accumulate* (`+=`) because a value used twice (e.g. `a * a`) receives a contribution
from each use. That is also why gradients must be reset (`zero_grad`) before every new backward.

On top of `Value` sit `Neuron`, `Layer` and `MLP`, a tiny neural-network library, and
`draw_graph`, which draws any expression's graph (data and grad on every node) with the
`graphviz` package. Rendering needs the system `dot` program (apt-get install graphviz /
brew install graphviz); without it you still get the DOT source to paste into an online viewer.

Run `python phase1_foundation/src/autograd_engine.py` to train an MLP on XOR and draw a graph.
"""

from __future__ import annotations

import argparse
import math
import numbers
import random
from pathlib import Path

import graphviz

NO_DOT_HELP = (
    "graphviz's `dot` program was not found, so the graph cannot be rendered to an image. "
    "Install it (Debian/Ubuntu: `sudo apt-get install graphviz`, macOS: `brew install graphviz`, "
    "conda: `conda install -c conda-forge graphviz`), or paste the DOT source into an online "
    "viewer such as https://dreampuf.github.io/GraphvizOnline"
)


class Value:
    """A scalar that records the operations producing it, so gradients can flow back through them."""

    def __init__(self, data: float, _children: tuple = (), _op: str = "", label: str = ""):
        if isinstance(data, Value):
            raise TypeError("Value(data) needs a plain number; the argument is already a Value.")
        if isinstance(data, bool) or not isinstance(data, numbers.Real):
            raise TypeError(f"Value holds a real number (int or float), got {type(data).__name__}.")
        self.data = float(data)
        self.grad = 0.0  # dL/d(this value), filled by backward()
        self._backward = lambda: None  # pushes self.grad to the children (set by each op)
        self._prev = tuple(_children)  # the Values this one was computed from
        self._op = _op  # the operation that produced it ('' for leaves)
        self.label = label

    def __repr__(self) -> str:
        name = f"{self.label}: " if self.label else ""
        return f"Value({name}data={self.data:.6g}, grad={self.grad:.6g})"

    # ------------------------------------------------------------------ binary operations
    def __add__(self, other) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data + other.data, (self, other), "+")

        def _backward():  # d(a+b)/da = 1, d(a+b)/db = 1
            self.grad += out.grad
            other.grad += out.grad

        out._backward = _backward
        return out

    def __mul__(self, other) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data * other.data, (self, other), "*")

        def _backward():  # d(a·b)/da = b, d(a·b)/db = a
            self.grad += other.data * out.grad
            other.grad += self.data * out.grad

        out._backward = _backward
        return out

    def __pow__(self, exponent) -> Value:
        if isinstance(exponent, bool) or not isinstance(exponent, numbers.Real):
            raise TypeError(
                "Value ** exponent supports a plain int/float exponent only; for a Value exponent "
                "write (exponent * base.log()).exp()."
            )
        if self.data == 0 and exponent < 0:
            raise ZeroDivisionError(f"0 ** {exponent} is undefined.")
        if self.data < 0 and not float(exponent).is_integer():
            raise ValueError(f"({self.data}) ** {exponent}: a negative base needs an integer exponent.")
        exponent = float(exponent)
        out = Value(self.data**exponent, (self,), f"**{exponent:g}")

        def _backward():  # d(a^n)/da = n · a^(n-1)
            self.grad += exponent * self.data ** (exponent - 1) * out.grad

        out._backward = _backward
        return out

    def __neg__(self) -> Value:  # -a = a · (-1)
        return self * -1

    def __sub__(self, other) -> Value:  # a - b = a + (-b)
        return self + (-other)

    def __truediv__(self, other) -> Value:  # a / b = a · b⁻¹
        other = other if isinstance(other, Value) else Value(other)
        return self * other**-1

    # reflected versions, so that `2 * a`, `1 + a`, `1 - a`, `1 / a` work with a plain number on the left
    def __radd__(self, other) -> Value:
        return self + other

    def __rmul__(self, other) -> Value:
        return self * other

    def __rsub__(self, other) -> Value:
        return Value(other) - self

    def __rtruediv__(self, other) -> Value:
        return Value(other) / self

    # ------------------------------------------------------------------ unary functions
    def tanh(self) -> Value:
        t = math.tanh(self.data)
        out = Value(t, (self,), "tanh")

        def _backward():  # d tanh(a)/da = 1 - tanh(a)²
            self.grad += (1.0 - t * t) * out.grad

        out._backward = _backward
        return out

    def exp(self) -> Value:
        out = Value(math.exp(self.data), (self,), "exp")

        def _backward():  # d e^a/da = e^a
            self.grad += out.data * out.grad

        out._backward = _backward
        return out

    def log(self) -> Value:
        if self.data <= 0:
            raise ValueError(f"log needs a positive argument, got {self.data}.")
        out = Value(math.log(self.data), (self,), "log")

        def _backward():  # d ln(a)/da = 1/a
            self.grad += out.grad / self.data

        out._backward = _backward
        return out

    def relu(self) -> Value:
        out = Value(max(0.0, self.data), (self,), "relu")

        def _backward():  # d relu(a)/da = 1 if a > 0 else 0 (0 at a == 0, like PyTorch)
            self.grad += (1.0 if self.data > 0 else 0.0) * out.grad

        out._backward = _backward
        return out

    # ------------------------------------------------------------------ backpropagation
    def topological_order(self) -> list[Value]:
        """Every Value this one depends on, each after all of its inputs (self comes last).

        An iterative depth-first search (a recursive one would hit Python's recursion limit on
        long chains such as a sum of a thousand terms).
        """
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, children_done = stack.pop()
            if children_done:
                order.append(node)  # post-order: all inputs are already in `order`
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for child in node._prev:
                if id(child) not in visited:
                    stack.append((child, False))
        return order

    def backward(self) -> None:
        """Fill .grad of every Value in the graph with d(self)/d(value); self.grad starts at 1.

        Gradients accumulate: call `zero_grad` (or set .grad = 0) on the leaves before a new pass.
        """
        order = self.topological_order()
        self.grad = 1.0  # dL/dL
        for node in reversed(order):  # output first, inputs last
            node._backward()


# ---------------------------------------------------------------------------------------------
# A tiny neural-network library on Values
# ---------------------------------------------------------------------------------------------
class Module:
    def parameters(self) -> list[Value]:
        return []

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = 0.0


class Neuron(Module):
    """act(w · x + b) with w_i, b ~ U(-1, 1); act is 'tanh', 'relu' or 'linear'."""

    def __init__(self, n_in: int, activation: str = "tanh", rng: random.Random | None = None):
        if activation not in ("tanh", "relu", "linear"):
            raise ValueError(f"activation must be 'tanh', 'relu' or 'linear', got {activation!r}.")
        rng = rng or random.Random()
        self.w = [Value(rng.uniform(-1, 1), label=f"w{i}") for i in range(n_in)]
        self.b = Value(rng.uniform(-1, 1), label="b")
        self.activation = activation

    def __call__(self, x) -> Value:
        if len(x) != len(self.w):
            raise ValueError(f"this neuron takes {len(self.w)} inputs, got {len(x)}.")
        z = sum((wi * xi for wi, xi in zip(self.w, x)), self.b)  # w · x + b
        if self.activation == "tanh":
            return z.tanh()
        if self.activation == "relu":
            return z.relu()
        return z

    def parameters(self) -> list[Value]:
        return self.w + [self.b]


class Layer(Module):
    """n_out independent neurons reading the same n_in inputs."""

    def __init__(self, n_in: int, n_out: int, activation: str = "tanh", rng: random.Random | None = None):
        self.neurons = [Neuron(n_in, activation, rng) for _ in range(n_out)]

    def __call__(self, x) -> list[Value]:
        return [neuron(x) for neuron in self.neurons]

    def parameters(self) -> list[Value]:
        return [p for neuron in self.neurons for p in neuron.parameters()]


class MLP(Module):
    """Layers of sizes [n_in, *n_outs]: tanh hidden layers, linear last layer."""

    def __init__(self, n_in: int, n_outs: list[int], seed: int | None = None):
        if n_in < 1 or not n_outs or any(n < 1 for n in n_outs):
            raise ValueError(
                f"MLP needs n_in >= 1 and a non-empty list of positive sizes, got {n_in}, {n_outs}."
            )
        rng = random.Random(seed)
        sizes = [n_in, *n_outs]
        self.layers = [
            Layer(sizes[i], sizes[i + 1], "linear" if i == len(n_outs) - 1 else "tanh", rng)
            for i in range(len(n_outs))
        ]

    def __call__(self, x) -> list[Value]:
        for layer in self.layers:
            x = layer(x)
        return x

    def parameters(self) -> list[Value]:
        return [p for layer in self.layers for p in layer.parameters()]


def mse(predictions: list[list[Value]], targets: list[list[float]]) -> Value:
    """Mean over examples and outputs of (prediction - target)²."""
    terms = [(p - t) ** 2 for pred, target in zip(predictions, targets) for p, t in zip(pred, target)]
    return sum(terms, Value(0.0)) / len(terms)


XOR_INPUTS = [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
XOR_TARGETS = [[0.0], [1.0], [1.0], [0.0]]


def train_mlp(
    model: MLP, inputs, targets, steps: int = 200, lr: float = 0.1, print_every: int | None = 50
) -> list[float]:
    """Full-batch gradient descent on the MSE; returns the loss at every step."""
    losses = []
    for step in range(steps):
        loss = mse([model(x) for x in inputs], targets)  # forward: builds the whole graph
        model.zero_grad()  # gradients accumulate, so clear the last step's
        loss.backward()  # backward: every parameter's .grad = dloss/dparam
        for p in model.parameters():
            p.data -= lr * p.grad  # gradient descent
        losses.append(loss.data)
        if print_every and (step % print_every == 0 or step == steps - 1):
            print(f"Step {step}, Loss: {loss.data:.4e}")
    return losses


# ---------------------------------------------------------------------------------------------
# Drawing the computation graph
# ---------------------------------------------------------------------------------------------
def draw_graph(root: Value, rankdir: str = "LR") -> graphviz.Digraph:
    """The computation graph of `root` as a graphviz Digraph (building it needs no `dot` program).

    One record node per Value ("label | data | grad") and one small node per operation, with edges
    input -> op -> result. Display it in Jupyter, `save_graph` it, or read `.source` (DOT text).
    """
    if not isinstance(root, Value):
        raise TypeError(f"draw_graph needs a Value, got {type(root).__name__}.")
    if rankdir not in ("LR", "TB", "RL", "BT"):
        raise ValueError(f"rankdir must be one of LR, TB, RL, BT, got {rankdir!r}.")
    graph = graphviz.Digraph(format="svg", graph_attr={"rankdir": rankdir})
    for node in root.topological_order():
        uid = str(id(node))
        label = f"{{ {node.label} | data {node.data:.4f} | grad {node.grad:.4f} }}"
        graph.node(name=uid, label=label, shape="record")
        if node._op:
            graph.node(name=uid + "_op", label=node._op, shape="circle")
            graph.edge(uid + "_op", uid)
            for child in node._prev:
                graph.edge(str(id(child)), uid + "_op")
    return graph


def save_graph(graph: graphviz.Digraph, path, fmt: str = "svg") -> Path:
    """Render `graph` to `path` + '.' + fmt; without `dot`, write the DOT source to `path` + '.dot'.

    Returns the path of the file written. The fallback prints how to install `dot`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        rendered = graph.render(outfile=path.with_suffix(f".{fmt}"), format=fmt, cleanup=True)
        return Path(rendered)
    except graphviz.ExecutableNotFound:
        path.with_suffix(".gv").unlink(missing_ok=True)  # render() wrote its source file before failing
        dot_path = path.with_suffix(".dot")
        dot_path.write_text(graph.source)
        print(f"{NO_DOT_HELP}\nWrote the DOT source to {dot_path} instead.")
        return dot_path


def graph_svg(graph: graphviz.Digraph) -> str | None:
    """The graph as SVG text for inline display, or None (after printing the DOT source) without `dot`."""
    try:
        return graph.pipe(format="svg", encoding="utf-8")
    except graphviz.ExecutableNotFound:
        print(f"{NO_DOT_HELP}\n\n{graph.source}")
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--graph-out", default="runs/phase1/neuron_graph", help="where to write the graph (no extension)"
    )
    args = parser.parse_args(argv)
    print("Training MLP(2, [4, 1]) on XOR with the scalar autograd engine")
    model = MLP(2, [4, 1], seed=0)
    train_mlp(model, XOR_INPUTS, XOR_TARGETS, steps=300, lr=0.1, print_every=50)
    for x, t in zip(XOR_INPUTS, XOR_TARGETS):
        print(f"  {x} -> {model(x)[0].data: .4f} (target {t[0]})")
    # a small expression: a neuron o = tanh(x1 w1 + x2 w2 + b)
    x1, x2 = Value(2.0, label="x1"), Value(0.0, label="x2")
    w1, w2, b = Value(-3.0, label="w1"), Value(1.0, label="w2"), Value(6.88137, label="b")
    o = (x1 * w1 + x2 * w2 + b).tanh()
    o.label = "o"
    o.backward()
    path = save_graph(draw_graph(o), args.graph_out)
    print(f"graph of o = tanh(x1*w1 + x2*w2 + b) written to {path}")


if __name__ == "__main__":
    main()
