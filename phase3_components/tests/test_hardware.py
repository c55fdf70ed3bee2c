"""Every dtype decision follows the hardware's facts and, where they are not enough, its measured speed.

Each row of the decision table is a test with made-up facts and timings; each fails when its branch breaks.
"""

import os
import subprocess
import sys

import pytest
import torch

from phase3_components.src import hardware
from phase3_components.src.hardware import HardwareFacts, choose_newton_schulz_dtype, choose_precision

AVX2_CPU = HardwareFacts("cpu", "AMD EPYC (Zen 3)", "AVX2", native_bf16=False, native_fp16=False)
AMX_CPU = HardwareFacts("cpu", "Xeon (Sapphire Rapids)", "AVX512", native_bf16=True, native_fp16=True)
T1000 = HardwareFacts("cuda:0", "Quadro T1000", "AVX2", False, True, (7, 5), 4 * 1024**3)
A100 = HardwareFacts("cuda:0", "A100", "AVX512", True, True, (8, 0), 40 * 1024**3)
H100 = HardwareFacts("cuda:0", "H100", "AVX512", True, True, (9, 0), 80 * 1024**3)


def timings(**gflops):
    """dtype -> GFLOP/s from keyword arguments fp32=..., bf16=..., fp16=...; an unlisted dtype fails."""
    table = {hardware.DTYPE_NAMES[dt]: dt for dt in hardware.DTYPE_NAMES}
    measured = {table[name]: value for name, value in gflops.items()}

    def gflops_of(dtype):
        assert dtype in measured, f"{dtype} was measured, but this hardware should not need it"
        return measured[dtype]

    return gflops_of


def test_avx2_only_cpu_iterates_newton_schulz_in_fp32_without_measuring():
    choice = choose_newton_schulz_dtype(facts=AVX2_CPU, gflops=timings())  # nothing may be timed
    assert choice.dtype == torch.float32
    assert "no native bf16" in choice.reason and "AVX2" in choice.reason


def test_cpu_with_native_bf16_measured_faster_iterates_in_bf16():
    choice = choose_newton_schulz_dtype(facts=AMX_CPU, gflops=timings(fp32=100, bf16=400))
    assert choice.dtype == torch.bfloat16
    assert "4x fp32" in choice.reason


def test_cpu_that_claims_bf16_but_runs_it_slowly_stays_in_fp32():
    # e.g. ONEDNN_MAX_CPU_ISA=AVX2 on an AMX machine, or a VM hiding AMX: the measurement decides
    choice = choose_newton_schulz_dtype(facts=AMX_CPU, gflops=timings(fp32=100, bf16=2))
    assert choice.dtype == torch.float32 and "0.02x fp32" in choice.reason
    # barely faster is not faster: the margin absorbs a noisy measurement
    assert (
        choose_newton_schulz_dtype(facts=AMX_CPU, gflops=timings(fp32=100, bf16=110)).dtype == torch.float32
    )


def test_t1000_with_fp16_measured_faster_trains_in_fp16_and_iterates_in_fp16():
    fast_fp16 = timings(fp32=2500, fp16=5000)
    precision = choose_precision("auto", facts=T1000, gflops=fast_fp16)
    assert precision.autocast_dtype is torch.float16 and "GradScaler" in precision.reason
    assert "7.5" in precision.reason and "no native bf16" in precision.reason
    assert choose_newton_schulz_dtype(facts=T1000, gflops=fast_fp16).dtype == torch.float16


def test_turing_card_whose_fp16_is_not_faster_trains_in_fp32():
    no_tensor_cores = timings(fp32=2500, fp16=2600)
    precision = choose_precision("auto", facts=T1000, gflops=no_tensor_cores)
    assert precision.autocast_dtype is None and precision.name == "fp32"
    assert "1x fp32" in precision.reason and "so fp32" in precision.reason
    assert choose_newton_schulz_dtype(facts=T1000, gflops=no_tensor_cores).dtype == torch.float32


@pytest.mark.parametrize("gpu", [A100, H100], ids=["A100", "H100"])
def test_ampere_and_hopper_train_in_bf16_and_iterate_in_the_fastest_half_type(gpu):
    precision = choose_precision("auto", facts=gpu, gflops=timings())  # native bf16: no measurement needed
    assert precision.autocast_dtype is torch.bfloat16 and "native bf16" in precision.reason
    ns = choose_newton_schulz_dtype(facts=gpu, gflops=timings(fp32=60, bf16=600, fp16=590))
    assert ns.dtype == torch.bfloat16


def test_cpu_auto_precision_is_fp32_and_explicit_choices_are_kept_as_asked():
    assert choose_precision("auto", facts=AMX_CPU, gflops=timings()).autocast_dtype is None
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        choice = choose_precision(name, facts=T1000, gflops=timings())
        assert choice.autocast_dtype is dtype and choice.reason == f"--precision {name}"
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("fp8")
    forced = choose_newton_schulz_dtype("fp32", facts=AMX_CPU, gflops=timings())
    assert forced.dtype == torch.float32 and forced.reason == "asked for fp32"
    with pytest.raises(ValueError, match="Newton-Schulz dtype must be one of"):
        choose_newton_schulz_dtype("int8")


def test_gpu_facts_follow_the_compute_capability_not_is_bf16_supported(monkeypatch):
    # torch.cuda.is_bf16_supported() says True on a Turing T1000, where bf16 is only emulated
    class Props:
        name, major, minor, total_memory = "Quadro T1000", 7, 5, 4 * 1024**3

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    hardware._facts.cache_clear()
    try:
        facts = hardware._facts("cuda:0")
    finally:
        hardware._facts.cache_clear()
    assert facts.compute_capability == (7, 5) and not facts.native_bf16 and facts.native_fp16
    assert "T1000" in facts.summary() and "native bf16 no" in facts.summary()


def test_the_measurement_runs_once_per_process_and_reports_finite_speeds(monkeypatch):
    hardware._measured_gflops.cache_clear()
    calls = []
    real = hardware._timed
    monkeypatch.setattr(hardware, "_timed", lambda *args: calls.append(1) or real(*args))
    first = hardware.matmul_gflops("cpu", torch.bfloat16)
    n_calls = len(calls)
    assert hardware.matmul_gflops("cpu", torch.bfloat16) == first and len(calls) == n_calls  # cached
    assert 0 < first < float("inf") and 0 < hardware.matmul_gflops("cpu", torch.float32) < float("inf")
    report = hardware.hardware_report("cpu", choose_precision("auto"))
    assert report["facts"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["decisions"]["precision"] == {"dtype": "fp32", "reason": "auto: fp32 on a CPU"}


def test_this_cpu_with_onednn_limited_to_avx2_chooses_fp32_newton_schulz():
    """The real measurement on the real machine: with oneDNN held to AVX2, bf16 matmuls are emulated
    (~50x slower than fp32), whether or not the CPU has native bf16; the choice must be fp32."""
    code = (
        "from phase3_components.src.hardware import choose_newton_schulz_dtype as c; "
        "print(c().name, '|', c().reason)"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fp32 |"), out.stdout
