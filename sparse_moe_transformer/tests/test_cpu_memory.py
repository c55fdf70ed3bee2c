"""keep_freed_memory(): the big buffers of a training step stop page-faulting on every step."""

import statistics
import subprocess
import sys
import textwrap

from sparse_moe_transformer.src.cpu_memory import keep_freed_memory

# Forward + backward of a t1000-sized MoE FFN layer (16 experts of 512 -> 1024 -> 512: each stacked
# expert weight and its gradient is 32 MiB), with the gradients set to None between steps as in
# training. Prints the minor page faults of each step.
SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from sparse_moe_transformer.src.cpu_memory import keep_freed_memory
    from sparse_moe_transformer.src.train import Config, SparseMoEFFN
    torch.set_num_threads(1)
    applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
    torch.manual_seed(0)
    cfg = Config(vocab_size=16, d_model=512, n_head=8, n_layer=1, n_expert=16, top_k=2, d_ff=1024)
    moe = SparseMoEFFN(cfg)
    x = torch.randn(64, 512)
    steps = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        moe(x)[0].square().mean().backward()
        for p in moe.parameters():
            p.grad = None
        steps.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, *steps)
    """
)
GRAD_PAGES = 2 * (32 << 20) // 4096  # 4 KiB pages of the two 32 MiB expert-weight gradients


def fault_steps(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    applied, *steps = out.stdout.split()
    return applied, [int(r) for r in steps]


def test_training_step_buffers_are_reused_instead_of_page_faulted_again():
    if not sys.platform.startswith("linux"):
        assert keep_freed_memory() is False  # only glibc is tuned; elsewhere nothing changes
        return
    _, default = fault_steps("default")
    applied, tuned = fault_steps("tuned")
    assert applied == "True"
    # default glibc: each 32 MiB gradient is mmap'ed fresh and unmapped again, so every page of it
    # faults (and is zeroed by the kernel) on every step
    assert all(s >= GRAD_PAGES for s in default[-3:]), default
    # tuned: once the heap has grown to the step's working set, its pages are reused (the heap
    # may still grow now and then while freed blocks coalesce, hence the median and the sum)
    assert statistics.median(tuned[-5:]) <= 0.05 * GRAD_PAGES, tuned
    assert sum(tuned[-5:]) <= 0.25 * sum(default[-5:]), (tuned, default)
