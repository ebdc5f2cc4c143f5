"""The engine's own W8A16 kernel (engine/native.py, engine/kernels/int8_weight_mm.cpp): it
computes what `torch._weight_int8pack_mm` computes (to the last bits of an fp32 sum), a row's
result does not depend on the rows batched with it, torch.compile calls it as an op, and the
engine falls back to the ATen kernel where it cannot be built."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import hardware, native
from engine.quant import Int8WeightOnlyLinear, quantize_per_channel

ROOT = Path(__file__).resolve().parents[2]
op = native.op()
needs_kernel = pytest.mark.skipif(op is None, reason=f"kernel unavailable: {native.unavailable()}")


@pytest.fixture(params=["best", "avx2"])
def isa(request, monkeypatch):
    """The kernel this CPU gets (AVX-512 BF16 here), and the AVX2 one it falls back to elsewhere."""
    if request.param == "avx2":
        monkeypatch.setenv("HYBRID_LLM_NATIVE_ISA", "avx2")  # read by the kernel at each call
    return request.param


def _weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return quantize_per_channel(torch.randn(n, k, generator=g))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 9, 17])
def test_kernel_equals_the_aten_kernel(m, dtype, isa):
    q, scale = _weights(37, 96)  # 37 outputs: whole tiles of 4 and 2 and a ragged tail
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)).to(dtype)
    got = op(x, q, scale.to(dtype))
    want = torch._weight_int8pack_mm(x, q, scale.to(dtype))
    assert got.dtype == dtype and got.shape == (m, 37)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-3)


@needs_kernel
def test_a_rows_bits_do_not_depend_on_the_batch(isa):
    rows = 11 if isa == "best" else 8  # AVX-512 prefill (> 8 rows) too; AVX2 hands > 8 rows to ATen
    q, scale = _weights(50, 128, seed=1)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    batched = op(x, q, scale.bfloat16())
    for i in range(rows):
        assert torch.equal(op(x[i:i + 1], q, scale.bfloat16()), batched[i:i + 1])
    assert torch.equal(op(x[3:8], q, scale.bfloat16()), batched[3:8])


@needs_kernel
def test_refuses_what_it_cannot_compute():
    q, scale = _weights(8, 24)  # K not a multiple of 16: the layer pads, the op refuses
    with pytest.raises(RuntimeError, match="multiple of 16"):
        op(torch.randn(2, 24), q, scale)
    with pytest.raises(RuntimeError, match="int8"):
        op(torch.randn(2, 32), torch.zeros(8, 32), scale)


@needs_kernel
def test_layer_uses_it_and_pads_k():
    q, scale = _weights(20, 40)  # K = 40 is padded to 48 by the layer
    layer = Int8WeightOnlyLinear(q, scale)
    assert layer.mm is op
    x = torch.randn(6, 40).bfloat16()
    want = (x.float() @ (q.float() * scale[:, None]).t())
    torch.testing.assert_close(layer(x).float(), want, rtol=2e-2, atol=2e-2)


@needs_kernel
def test_compiled_graph_calls_the_op():
    q, scale = _weights(24, 64)
    x = torch.randn(5, 64).bfloat16()

    def f(x):
        return torch.ops.hybrid_llm.int8_weight_mm(x * 2, q, scale.bfloat16()) + 1

    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_switched_off_means_the_aten_kernel(monkeypatch):
    monkeypatch.setenv("HYBRID_LLM_NATIVE", "0")
    assert native.unavailable() == "HYBRID_LLM_NATIVE=0"
    assert native.op.__wrapped__() is None  # uncached: what a process started with it off gets
    monkeypatch.setattr(native, "op", lambda: None)
    q, scale = _weights(8, 32)
    layer = Int8WeightOnlyLinear(q, scale)
    assert layer.mm is torch._weight_int8pack_mm
    x = torch.randn(3, 32).bfloat16()
    assert torch.equal(layer(x), torch._weight_int8pack_mm(x, layer.q, layer.scale))


def test_a_cpu_without_avx2_is_told_why(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ["fma"])
    assert native.unavailable() == "the CPU lacks avx2"


@needs_kernel
def test_a_build_is_found_whole_and_loaded_without_a_compiler(tmp_path):
    """What an image relies on: `python -m engine.native` builds into HYBRID_LLM_KERNELS (a
    directory others can read, renamed into place whole), and a later process loads that build
    with no working compiler."""
    env = {**os.environ, "HYBRID_LLM_KERNELS": str(tmp_path)}
    first = subprocess.run([sys.executable, "-m", "engine.native"], env=env, capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert first.returncode == 0 and "built in" in first.stdout, first.stderr
    (build,) = tmp_path.iterdir()  # no temporary directory left behind
    assert (build / "hybrid_llm_kernels.so").is_file() and stat.S_IMODE(build.stat().st_mode) == 0o755
    second = subprocess.run([sys.executable, "-m", "engine.native"], env={**env, "CXX": "/bin/false"},
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert second.returncode == 0 and str(build) in second.stdout, second.stderr
