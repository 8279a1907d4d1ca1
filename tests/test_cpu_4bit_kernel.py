"""The project's CPU 4-bit kernel (`modeling_deepseekmoe/cpu_4bit_kernel.py`, `csrc/gemv_4bit.c`): every variant the
CPU at hand runs (portable C always; AVX2, AVX512, AVX512-BF16 where the CPU has them) equals the product with the
dequantized weight, its build is cached and atomic, a machine without a compiler falls back, and the model's 4-bit
layers call it for short inference calls only."""

import copy

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseekmoe import cpu_4bit_kernel, quantization


bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import quantize_4bit  # noqa: E402


def _runnable_variants() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()
    variants = ["portable"]
    if capability in ("AVX2",) or capability.startswith("AVX512"):
        variants.append("avx2")
    if capability.startswith("AVX512"):
        variants.append("avx512")
        if torch.cpu._is_avx512_bf16_supported():
            variants.append("avx512_bf16")
    return variants


VARIANTS = _runnable_variants()
needs_compiler = pytest.mark.skipif(cpu_4bit_kernel._compiler() is None, reason="no C compiler on this machine")


def _quantized(out_features, in_features, dtype, quant_type, nested, blocksize=64, seed=0):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


@needs_compiler
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_variant_equals_the_product_with_the_dequantized_weight(isa, quant_type, nested, dtype):
    # 48 rows: a thread's row range of 16 and more; 15 input rows run the passes of 8, 4, 2 and 1 rows.
    for in_features, blocksize in [(192, 64), (256, 128), (96, 32)]:
        data, state = _quantized(48, in_features, dtype, quant_type, nested, blocksize)
        assert cpu_4bit_kernel.fits(state)
        for rows in (1, 15):
            x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
            dense = quantization.dequantize_weight(bnb.nn.Params4bit(data, quant_state=state, bnb_quantized=True),
                                                   x.dtype)  # fmt: skip
            expected = F.linear(x.float(), dense.float())  # the same products, summed in fp32
            output = cpu_4bit_kernel.matmul(x, data, state, isa)
            assert output.dtype == dtype and output.shape == (rows, 48)
            tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]  # output rounding
            torch.testing.assert_close(output.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max())
            # fp32 input, same weight: only the summation order differs.
            torch.testing.assert_close(
                cpu_4bit_kernel.matmul(x.float(), data, state, isa),
                F.linear(x.float(), quantization.dequantize_weight(
                    bnb.nn.Params4bit(data, quant_state=state, bnb_quantized=True), torch.float32)),
                rtol=1e-5, atol=1e-5,
            )  # fmt: skip


@needs_compiler
@pytest.mark.parametrize("nested", [False, True])
def test_a_changed_quant_state_is_read_again(nested):
    # The kernel keeps each state's C arguments: a copy of a state whose scales were then replaced must not be computed
    # with the original's.
    data, state = _quantized(32, 128, torch.bfloat16, "nf4", nested)
    x = torch.randn(3, 128).to(torch.bfloat16)
    first = cpu_4bit_kernel.matmul(x, data, state).float()
    copied = copy.deepcopy(state)
    if nested:
        copied.state2.absmax = copied.state2.absmax * 2
    else:
        copied.absmax = copied.absmax * 2
    dense = quantization.dequantize_weight(bnb.nn.Params4bit(data, quant_state=copied, bnb_quantized=True), x.dtype)
    expected = F.linear(x.float(), dense.float())
    torch.testing.assert_close(cpu_4bit_kernel.matmul(x, data, copied).float(), expected, rtol=8e-3, atol=1e-2)
    assert not torch.allclose(expected, first, rtol=0.1)
    torch.testing.assert_close(cpu_4bit_kernel.matmul(x, data, state).float(), first, rtol=0, atol=0)


@needs_compiler
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_variant_dequantizes_to_the_bit(isa, quant_type, nested, dtype):
    # Blocks within rows (the byte-table pass on AVX2), spanning rows, a last block cut short, an odd element count.
    for shape, blocksize in [((48, 192), 64), ((16, 256), 128), ((6, 96), 64), ((5, 99), 32), ((3, 4), 64)]:
        data, state = _quantized(*shape, dtype, quant_type, nested, blocksize)
        assert cpu_4bit_kernel.dequantizes(state)
        expected = quantization._dequantize_4bit_with_torch(data, state)  # bitsandbytes' format, in torch ops
        for out_dtype in (None, torch.float32, torch.bfloat16, torch.float16):
            dense = cpu_4bit_kernel.dequantize(data, state, out_dtype, isa=isa)
            reference = expected if out_dtype is None else expected.to(out_dtype)
            assert dense.dtype == reference.dtype and dense.shape == shape
            assert torch.equal(dense.view(torch.uint8), reference.view(torch.uint8)), (shape, out_dtype)
        out = torch.empty(2, *shape, dtype=torch.bfloat16)[1]  # a contiguous slice, as an expert's rows
        assert cpu_4bit_kernel.dequantize(data, state, out=out, isa=isa) is out
        assert torch.equal(out.view(torch.uint8), expected.to(torch.bfloat16).view(torch.uint8))


def test_fits_only_blocks_within_rows():
    assert cpu_4bit_kernel.fits(_quantized(8, 128, torch.float32, "nf4", False)[1])
    assert not cpu_4bit_kernel.fits(_quantized(16, 32, torch.float32, "nf4", False)[1])  # blocks of 64 span rows
    assert not cpu_4bit_kernel.fits(None)


@needs_compiler
def test_the_build_is_cached_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEKMOE_KERNEL_CACHE", str(tmp_path))
    cpu_4bit_kernel.load.cache_clear()
    try:
        library = cpu_4bit_kernel.load("portable")
        assert library.gemv_4bit_isa() == b"portable"
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].suffix == ".so" and built[0].stat().st_mode & 0o777 == 0o755
        cpu_4bit_kernel.load.cache_clear()
        monkeypatch.setattr(cpu_4bit_kernel.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached kernel"))
        cpu_4bit_kernel.load("portable")
    finally:
        cpu_4bit_kernel.load.cache_clear()


def test_no_compiler_or_a_failing_build_says_why_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEKMOE_KERNEL_CACHE", str(tmp_path))
    for compiler, message in [(None, "no C compiler found"), ("false", "could not build gemv_4bit.c")]:
        monkeypatch.setattr(cpu_4bit_kernel, "_compiler", lambda compiler=compiler: compiler)
        cpu_4bit_kernel.load.cache_clear()
        cpu_4bit_kernel.available.cache_clear()
        try:
            with pytest.raises(cpu_4bit_kernel.KernelUnavailable, match=message):
                cpu_4bit_kernel.load("portable")
            assert not cpu_4bit_kernel.available() and message in cpu_4bit_kernel.unavailable_reason()
            assert not quantization.own_4bit_cpu_kernel_available()
            assert list(tmp_path.iterdir()) == []  # nothing half-written
        finally:
            cpu_4bit_kernel.load.cache_clear()
            cpu_4bit_kernel.available.cache_clear()


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("DEEPSEEKMOE_CPU_4BIT_KERNEL", "0")
    cpu_4bit_kernel.available.cache_clear()
    try:
        assert not cpu_4bit_kernel.available()
        assert "DEEPSEEKMOE_CPU_4BIT_KERNEL" in cpu_4bit_kernel.unavailable_reason()
    finally:
        cpu_4bit_kernel.available.cache_clear()


@needs_compiler
@pytest.mark.skipif(cpu_4bit_kernel.native_isa() == "portable", reason="the own kernel serves AVX2 / AVX512 CPUs")
def test_linear4bit_takes_the_kernel_for_short_inference_calls_only(monkeypatch):
    monkeypatch.setattr(quantization, "packed_4bit_cpu_kernel_available", lambda: False)  # as on a CPU without it
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    linear = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=linear)._quantize("cpu")
    torch.nn.init.normal_(linear.bias)
    quantization.configure_4bit_cpu_kernels(linear.eval())
    assert linear.own_kernel and quantization.cpu_4bit_kernel_path(linear).startswith(quantization.OWN_KERNEL_PATH)
    calls = []
    matmul = cpu_4bit_kernel.matmul
    monkeypatch.setattr(cpu_4bit_kernel, "matmul", lambda *args, **kwargs: calls.append(1) or matmul(*args, **kwargs))
    dense = quantization.dequantize_weight(linear.weight, torch.float32)
    most = quantization.CPU_KERNEL_MAX_ROWS
    for rows, kernel in [(1, True), (most, True), (most + 1, False)]:
        calls.clear()
        x = torch.randn(rows, 128)
        with torch.no_grad():
            torch.testing.assert_close(linear(x), F.linear(x, dense, linear.bias), rtol=1e-5, atol=1e-5)
        assert bool(calls) == kernel, rows
    calls.clear()
    x = torch.randn(1, 128, requires_grad=True)
    linear(x).sum().backward()  # a call that needs the input's gradient: the dequantizing path
    assert not calls and x.grad is not None
    quantization.configure_4bit_cpu_kernels(linear, packed=False)
    with torch.no_grad():
        linear(torch.randn(1, 128))
    assert not calls and not linear.own_kernel
