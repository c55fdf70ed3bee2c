"""chunked_loss.linear_cross_entropy equals F.cross_entropy on the materialised logits: the loss and
the gradients of the head's input and weight, over several chunks, with ignored targets, with the soft-cap,
under bf16 autocast, and inside the model's training step."""

import pytest
import torch
import torch.nn.functional as F

from sparse_moe_transformer.src import chunked_loss
from sparse_moe_transformer.src.chunked_loss import linear_cross_entropy
from sparse_moe_transformer.src.train import SparseMoETransformer, moe_losses, preset_config


def reference(h, weight, targets, softcap=None):
    z = h @ weight.t()  # [N, V]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.float(), targets, ignore_index=-100)


def inputs(N=37, C=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 2.0).requires_grad_()  # large logits: the cap matters
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100  # some ignored positions
    return h, weight, targets


def grads(loss_fn, h, weight, targets, softcap, scale=1.0):
    h, weight = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = loss_fn(h, weight, targets, softcap)
    (loss * scale).backward()
    return loss.detach(), h.grad, weight.grad


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_loss_and_gradients_equal_cross_entropy_on_the_materialised_logits(monkeypatch, softcap):
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 8 * 50)  # 8 rows per chunk: 5 chunks, the last short
    h, weight, targets = inputs()
    ref = grads(reference, h, weight, targets, softcap, scale=2.5)  # a non-unit incoming gradient
    ours = grads(linear_cross_entropy, h, weight, targets, softcap, scale=2.5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ours[2][:, 0].abs().sum() > 0  # the weight's gradient is really there
    # without gradients (evaluation): the same loss, one chunk at a time
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, weight, targets, softcap), ref[0])


def test_ignored_rows_give_no_gradient_and_all_ignored_is_nan_as_in_torch():
    h, weight, targets = inputs()
    _, grad_h, _ = grads(linear_cross_entropy, h, weight, targets, None)
    assert torch.all(grad_h[targets == -100] == 0) and torch.all(grad_h[targets != -100].abs().sum(1) > 0)
    none = torch.full_like(targets, -100)
    assert torch.isnan(linear_cross_entropy(h, weight, none)) and torch.isnan(reference(h, weight, none))


def test_bf16_autocast_matches_the_plain_head_under_autocast():
    h, weight, targets = inputs(N=64, C=32, V=300)
    with torch.autocast("cpu", torch.bfloat16):
        ref = grads(reference, h, weight, targets, None)
        ours = grads(linear_cross_entropy, h, weight, targets, None)
    assert ours[1].dtype == torch.float32 and ours[2].dtype == torch.float32  # h's and the weight's dtypes
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # bf16 matmuls, accumulated differently


def test_bad_shapes_are_named():
    h, weight, targets = inputs()
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(h, weight, targets[:-1])
    with pytest.raises(ValueError, match=r"need h \[N, C\]"):
        linear_cross_entropy(h, weight[:, :-1], targets)
    for bad_id in (50, -3):  # V = 50: one past the vocabulary, and a negative id that is not -100
        wrong = targets.clone()
        wrong[1] = bad_id
        with pytest.raises(ValueError, match=rf"token ids in \[0, 50\) or -100.*got {bad_id}"):
            linear_cross_entropy(h, weight, wrong)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_the_models_chunked_training_loss_equals_its_logits_loss(softcap):
    """forward(..., return_logits=False), which train_step and evaluate use, gives the loss and every
    parameter gradient of forward(...) with logits."""
    torch.manual_seed(0)
    config = preset_config("tiny", logit_softcap=softcap, dropout=0.0)
    model = SparseMoETransformer(config)
    x, y = torch.randint(0, config.vocab_size, (3, 16)), torch.randint(0, config.vocab_size, (3, 16))
    y[0, :4] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(x, y, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        moe_losses(out, config).total.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="pass targets"):
        model(x, return_logits=False)


def test_fp16_autocast_gradients_match_fp32_at_gpt2_vocabulary_with_a_grad_scaler_sized_gradient():
    """Under fp16 (a T1000's autocast), the per-token gradients (softmax - onehot) / count are ~2e-8 at
    V = 50,257 and 1,024 tokens: below fp16's smallest subnormal (6e-8). Scaled by 1/count before the cast
    to fp16 they would flush to 0 (the GradScaler's 65,536 only arrives in the backward pass); kept in
    [-1, 1] through the matmuls and scaled in fp32 afterwards they survive."""
    N, C, V, grad_scale = 1024, 64, 50_257, 65536.0
    g = torch.Generator().manual_seed(7)
    h = torch.randn(N, C, generator=g)
    weight = torch.randn(V, C, generator=g) * (2.0 / C**0.5)  # logits with std 2, as in a trained model
    targets = torch.randint(0, V, (N,), generator=g)
    _, ref_h, ref_w = grads(reference, h, weight, targets, None, scale=grad_scale)  # fp32, materialised
    with torch.autocast("cpu", dtype=torch.float16):
        _, got_h, got_w = grads(linear_cross_entropy, h, weight, targets, None, scale=grad_scale)
    for name, got, ref in (("dL/dh", got_h, ref_h), ("dL/dW", got_w, ref_w)):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        relative_error = ((got - ref).norm() / ref.norm()).item()
        assert relative_error <= 1e-2, f"{name}: relative error {relative_error:.3g}"
        resolved = ref.abs() >= 2.0**-24  # the entries the scaled fp16 gradient can represent at all
        agree = (torch.sign(got[resolved]) == torch.sign(ref[resolved])).float().mean().item()
        assert agree >= 0.99, f"{name}: signs agree on {agree:.1%} of {int(resolved.sum()):,} entries"
