"""The production training step, proven: what it backpropagates, how it accumulates micro-batches,
and what fp16 loss scaling does. Each test fails if a term, a division or a skip is removed."""

import copy

import torch

from sparse_moe_transformer.src.moe_optimizer import make_optimizer
from sparse_moe_transformer.src.runtime import Runtime
from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config, train_step
from sparse_moe_transformer.src.train_settings import TrainSettings

CPU = torch.device("cpu")


def tiny(seed=0, **overrides) -> SparseMoETransformer:
    torch.manual_seed(seed)
    return SparseMoETransformer(preset_config("tiny", **overrides))


def settings(**overrides) -> TrainSettings:
    # AdamW: these tests compare gradients and updates; Muon's are tested in test_moe_optimizer.py
    values = dict(batch_size=4, grad_accum_steps=1, seq_len=16, max_steps=10, max_lr=1e-2, min_lr=1e-3,
                  warmup_steps=0, grad_clip=0.0, optimizer="adamw")  # fmt: skip
    return TrainSettings(**{**values, **overrides})


def batches(n, batch_size, seed=0, vocab=97, T=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n * batch_size, T + 1), generator=g)
    return [
        (ids[i : i + batch_size, :-1], ids[i : i + batch_size, 1:]) for i in range(0, len(ids), batch_size)
    ]


def gradients_seen_by_the_optimizer(model, optimizer) -> list:
    """Record the gradients at every optimizer.step() (train_step clears them afterwards)."""
    seen, step = [], optimizer.step

    def recording_step(*args, **kwargs):
        seen.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    optimizer.step = recording_step
    return seen


def switch_loss_by_hand(out) -> torch.Tensor:
    """E * sum_i f_i P_i per layer, mean over layers, written out here (not with the library's function)."""
    per_layer = []
    for logits, routing in zip(out.router_logits, out.routing):
        E = logits.shape[-1]
        f = torch.bincount(routing.topk_index.flatten(), minlength=E).float() / routing.topk_index.numel()
        per_layer.append(E * (f * torch.softmax(logits.float(), -1).mean(0)).sum())
    return torch.stack(per_layer).mean()


def test_the_backpropagated_loss_is_lm_plus_weighted_aux_and_z_and_aux_reaches_the_router():
    model = tiny(aux_loss_coef=0.3, z_loss_coef=0.05)
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model, settings(), CPU)
    seen = gradients_seen_by_the_optimizer(model, optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    (x, y) = batches(1, 4)[0]
    result = train_step(model, optimizer, scaler, [(x, y)], settings(), Runtime(CPU, None))

    out = reference(x, y)
    aux, z = (
        switch_loss_by_hand(out),
        torch.stack([torch.logsumexp(g, -1).square().mean() for g in out.router_logits]).mean(),
    )
    lm, aux_val, z_val, total = result["losses"].tolist()
    torch.testing.assert_close(torch.tensor([lm, aux_val, z_val]), torch.stack([out.loss, aux, z]).detach())
    torch.testing.assert_close(torch.tensor(total), (out.loss + 0.3 * aux + 0.05 * z).detach())

    params = dict(reference.named_parameters())
    names = list(seen[0])
    expected = torch.autograd.grad(
        out.loss + 0.3 * aux + 0.05 * z, [params[n] for n in names], retain_graph=True
    )
    for name, want in zip(names, expected):
        torch.testing.assert_close(seen[0][name], want, atol=1e-6, rtol=1e-5)
    # the router's gradient of (total - lm) is exactly 0.3 * d aux + 0.05 * d z, and neither term is 0
    gate = params["layers.0.moe.gate.weight"]
    d_lm, d_aux, d_z = (torch.autograd.grad(t, gate, retain_graph=True)[0] for t in (out.loss, aux, z))
    torch.testing.assert_close(seen[0]["layers.0.moe.gate.weight"] - d_lm, 0.3 * d_aux + 0.05 * d_z)
    assert d_aux.abs().sum() > 0 and d_z.abs().sum() > 0


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger():
    # The Switch loss multiplies two per-batch means, so k micro-batches optimise a (slightly)
    # different balance objective than one big batch: it is switched off here. The LM loss and
    # the z-loss are means over tokens, so with equal micro-batches the gradients must agree exactly.
    k, b = 4, 2
    data = batches(3 * k, b, seed=5)  # three optimizer steps
    runs = {}
    for name, accum, batch in (("accumulated", k, b), ("big batch", 1, k * b)):
        model = tiny(seed=1, aux_loss_coef=0.0)
        s = settings(grad_accum_steps=accum, batch_size=batch, max_lr=1e-3, min_lr=1e-4)
        optimizer = make_optimizer(model, s, CPU)
        seen = gradients_seen_by_the_optimizer(model, optimizer)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for step in range(3):
            micro = data[step * k : (step + 1) * k]
            if accum == 1:
                micro = [(torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))]
            train_step(model, optimizer, scaler, micro, s, Runtime(CPU, None))
        runs[name] = (seen, dict(model.named_parameters()))
    (seen_a, weights_a), (seen_b, weights_b) = runs["accumulated"], runs["big batch"]
    for step in range(3):  # the gradients themselves (AdamW alone would hide a gradient k times too big)
        for name in seen_b[step]:
            torch.testing.assert_close(seen_a[step][name], seen_b[step][name], atol=1e-6, rtol=1e-5)
    for name in weights_b:
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=1e-5, rtol=1e-5)


def test_fp16_an_overflowing_step_is_skipped_and_the_scale_goes_down():
    model = tiny(seed=2)
    s = settings()
    optimizer = make_optimizer(model, s, CPU)
    rt = Runtime(CPU, torch.float16)  # CPU autocast in fp16, with torch.amp.GradScaler("cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # the scaled loss overflows fp16
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, optimizer, scaler, batches(1, 4), s, rt)
    assert scaler.get_scale() == 2.0**59  # halved (backoff factor 0.5)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # the step was skipped: no weight moved
    scaler.update(2.0**8)  # a scale that fits: now the step is taken
    train_step(model, optimizer, scaler, batches(1, 4, seed=1), s, rt)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_and_fp16_keep_fp32_master_weights_and_optimizer_state():
    for dtype in (torch.bfloat16, torch.float16):
        model = tiny(seed=3)
        s = settings()
        optimizer = make_optimizer(model, s, CPU)
        scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
        result = train_step(model, optimizer, scaler, batches(1, 4), s, Runtime(CPU, dtype))
        assert torch.isfinite(result["losses"]).all()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        for state in optimizer.state.values():
            assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
