"""What the full-size 4-bit speed and memory rely on (issue: the real 16B), pinned at tiny dims on CPU:
the faster CPU 4-bit quantizer is bit-identical to bitsandbytes', quantizing loads read shards without mmap, a decode
step touches only the selected experts' quantized weights, a load that cannot fit is refused before reading, and
`benchmarks/full_size.py` runs end to end."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from modeling_deepseekmoe import bnb_cpu_quantize, quantization
from modeling_deepseekmoe.checkpoint import write_random_released_checkpoint
from modeling_deepseekmoe.footprint import InsufficientMemoryError, check_fits_in_memory, memory_footprint
from modeling_deepseekmoe.loading import load_pretrained_model
from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoESparseMoeBlock


bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

# gate/up [32, 64] take bitsandbytes' packed CPU kernel where it exists, down [64, 32] is dequantized: both paths.
DIMS = {"hidden_size": 64, "moe_intermediate_size": 32, "intermediate_size": 64, "n_shared_experts": 1}


def _bitsandbytes_quantize_4bit(A, blocksize, quant_type):
    """bitsandbytes' own (torch-op) kernel, past the CPU kernel we register."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_4bit.default.redispatch(keys, A, blocksize, quant_type, torch.uint8)


def _edge_values(quant_type: str) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(quant_type, device="cpu").float().sort().values
    midpoints = (code[:-1] + code[1:]) / 2
    up, down = midpoints.nextafter(torch.tensor(2.0)), midpoints.nextafter(torch.tensor(-2.0))
    values = torch.cat([midpoints, up, down, code, torch.tensor([1.0, -1.0, 0.0, -0.0])])
    return values.repeat(4)[: 64 * (values.numel() * 4 // 64)]  # whole blocks whose absmax is 1: scaled == value


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_4bit_quantizer_is_bit_identical_to_bitsandbytes(quant_type, dtype, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(96, 1024, generator=generator) * 0.02,  # several chunks
        torch.randn(7, 3 * 64 + 5, generator=generator),  # a partial last block, an odd count
        torch.zeros(4, 64),  # all-zero blocks (absmax 0)
        torch.randn(333, generator=generator) * 5,
        _edge_values(quant_type),  # values on, just above and just below every code midpoint
    ]
    assert bnb_cpu_quantize.register()
    calls = []
    monkeypatch.setattr(bnb_cpu_quantize, "quantize_4bit_cpu",
                        lambda *args, _f=bnb_cpu_quantize.quantize_4bit_cpu: calls.append(1) or _f(*args))  # fmt: skip
    for values in inputs:
        values = values.to(dtype)
        for blocksize in (64, 128):
            expected = _bitsandbytes_quantize_4bit(values, blocksize, quant_type)
            assert not calls
            packed, absmax = bnb.functional.quantize_4bit(values, blocksize=blocksize, quant_type=quant_type)
            assert calls, "bitsandbytes' quantize_4bit did not reach the registered CPU kernel"
            calls.clear()
            assert torch.equal(packed, expected[0]) and torch.equal(absmax.absmax, expected[1])


def _write(directory: Path, dtype=torch.float32) -> Path:
    return write_random_released_checkpoint(tiny_config(**DIMS), directory, dtype=dtype, max_shard_bytes=60_000)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("decode") / "released")


def test_quantizing_loads_read_shards_without_mmap(checkpoint, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.safe_open
    backends = []

    def spy(*args, **kwargs):
        backends.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_open", spy)
    load_pretrained_model(checkpoint, dtype=torch.float32)
    plain = set(backends)
    backends.clear()
    load_pretrained_model(checkpoint, dtype=torch.float32, load_in_4bit=True)
    assert plain == {"mmap"} and set(backends) == {"pread"}
    assert modeling_utils.safe_open is spy  # restored after the quantized load


class _Touched:
    """Which routed experts' quantized weights were read: by a matmul on them, or by dequantizing them."""

    def __init__(self, model, monkeypatch):
        self.owner = {}
        for layer, block in enumerate(model.modules()):
            if isinstance(block, DeepseekMoESparseMoeBlock):
                for index in range(block.experts.num_experts):
                    for name in ("gate", "up", "down"):
                        weight = getattr(block.experts.expert(index), name).weight
                        self.owner[id(weight)] = (id(block), index)
        self.seen: set[tuple[int, int]] = set()
        dequantize, linear = quantization.dequantize_weight, quantization.DeepseekMoEExpertWeight.linear

        def spy_dequantize(weight, *args, **kwargs):
            self.record(weight)
            return dequantize(weight, *args, **kwargs)

        def spy_linear(projection, x):
            self.record(projection.weight)
            return linear(projection, x)

        monkeypatch.setattr(quantization, "dequantize_weight", spy_dequantize)
        monkeypatch.setattr(quantization.DeepseekMoEExpertWeight, "linear", spy_linear)

    def record(self, weight) -> None:
        if id(weight) in self.owner:
            self.seen.add(self.owner[id(weight)])


def _selected_experts(model) -> tuple[set, list]:
    selected, handles = set(), []
    for block in model.modules():
        if isinstance(block, DeepseekMoESparseMoeBlock):
            def hook(gate, args, output, block_id=id(block)):
                selected.update((block_id, int(index)) for index in output[3].unique())
            handles.append(block.gate.register_forward_hook(hook))
    return selected, handles


@pytest.mark.parametrize("kernels", ["default", "own", "off"])
def test_a_decode_step_reads_only_the_selected_experts(checkpoint, monkeypatch, kernels):
    """`default`: bitsandbytes' packed kernel where the CPU has it, else the own kernel (or dequantizing); `own`: the
    own kernel, as on a CPU without the packed one; `off`: dequantize + matmul."""
    if kernels == "own":
        if not quantization.cpu_4bit_kernel.available() or quantization.cpu_4bit_kernel.native_isa() == "portable":
            pytest.skip("the own 4-bit kernel serves AVX2 / AVX512 CPUs with a C compiler")
        monkeypatch.setattr(quantization, "packed_4bit_cpu_kernel_available", lambda: False)
    packed = kernels != "off"
    model = load_pretrained_model(checkpoint, dtype=torch.float32, load_in_4bit=True).eval()
    quantization.configure_4bit_cpu_kernels(model, packed=packed)
    calls = []
    matmul = quantization.cpu_4bit_kernel.matmul
    monkeypatch.setattr(quantization.cpu_4bit_kernel, "matmul", lambda *a, **k: calls.append(1) or matmul(*a, **k))
    reference = quantization.dequantize_model(copy.deepcopy(model)).eval()
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefill = model(prompt, use_cache=True)
        touched = _Touched(model, monkeypatch)
        selected, handles = _selected_experts(model)
        next_token = prefill.logits[:, -1:].argmax(-1)
        step = model(next_token, past_key_values=prefill.past_key_values, use_cache=True).logits
        for handle in handles:
            handle.remove()
        expected = reference(torch.cat([prompt, next_token], 1)).logits[:, -1:]
    assert len(selected) == 2 * 3  # 2 MoE layers, top-3 of 8 for the one token
    assert touched.seen == selected
    assert bool(calls) == (kernels == "own" or (packed and quantization.own_4bit_cpu_kernel_available()))
    error = (step - expected).norm() / expected.norm()
    assert error < (2e-2 if packed and quantization.packed_4bit_cpu_kernel_available() else 1e-5)


def test_a_load_that_cannot_fit_is_refused_before_reading(tmp_path, monkeypatch):
    directory = _write(tmp_path / "released", dtype=torch.bfloat16)
    config = tiny_config(**DIMS)
    table = memory_footprint(config)
    monkeypatch.setattr("modeling_deepseekmoe.footprint.LOAD_HEADROOM_BYTES", 0)
    between = (table.bytes("nf4-dq") + table.bytes("int8")) // 2  # 4-bit fits, 8-bit and bf16 do not
    monkeypatch.setattr("modeling_deepseekmoe.footprint.available_memory_bytes", lambda: between)
    import transformers.modeling_utils as modeling_utils

    opened = []
    monkeypatch.setattr(modeling_utils, "safe_open", lambda *a, **k: opened.append(a) or None)
    with pytest.raises(InsufficientMemoryError, match=r"need .* GB in bf16 .* load it with --load_in_4bit \("):
        load_pretrained_model(directory)
    with pytest.raises(InsufficientMemoryError, match=r"float32"):
        load_pretrained_model(directory, dtype="float32")
    with pytest.raises(InsufficientMemoryError, match=r"8-bit"):
        load_pretrained_model(directory, load_in_8bit=True)
    assert not opened
    monkeypatch.undo()
    check_fits_in_memory(config, "bf16", available=table.bytes("bf16") + 2_000_000_000)  # no error
    # With an offload plan, the load is the user's to size (transformers' device_map="auto" + offload_folder).
    monkeypatch.setattr("modeling_deepseekmoe.footprint.available_memory_bytes", lambda: between)
    model = load_pretrained_model(directory, device_map="auto", max_memory={"cpu": 50_000},
                                  offload_folder=str(tmp_path / "offload"))  # fmt: skip
    assert "disk" in set(model.hf_device_map.values())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[2, 3, 4]])).logits).all()


def test_full_size_script_runs_at_tiny_dims(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import full_size
    finally:
        sys.path.pop(0)
    results = full_size.main(["--tiny", "--checkpoint_dir", str(tmp_path / "ckpt"), "--precisions", "nf4",
                              "--output", str(tmp_path / "result"), "--new_tokens", "3"])  # fmt: skip
    row = results["precisions"][0]
    assert "error" not in row, row
    assert row["load_seconds"] > 0 and row["seconds_per_token"] > 0 and row["footprint_gb"] > 0
    assert 0 < row["load_peak_total_gb"] < 8
    assert results["check"]["tensors"] == len(json.loads((tmp_path / "ckpt" / "model.safetensors.index.json")
                                                         .read_text())["weight_map"])  # fmt: skip
    assert json.loads((tmp_path / "result.json").read_text())["precisions"][0]["precision"] == "nf4"
    assert "| nf4 |" in (tmp_path / "result.md").read_text()
