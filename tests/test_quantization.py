"""4-bit / 8-bit loading in which the routed experts really are quantized (bitsandbytes on CPU, tiny models)."""

import ast
import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_config
from modeling_deepseekmoe import DeepseekMoEConfig, quantization
from modeling_deepseekmoe.checkpoint import (
    checkpoint_tensor_files,
    read_tensor_shapes,
    released_tensor_shapes,
    write_random_released_checkpoint,
)
from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoEExperts, DeepseekMoEMLP, DeepseekMoESparseMoeBlock
from modeling_deepseekmoe.quantization import (
    DEQUANTIZE_KERNEL_PATH,
    PACKED_KERNEL_PATH,
    DeepseekMoEExpertWeight,
    DeepseekMoEQuantizedExperts,
    configure_4bit_cpu_kernels,
    cpu_4bit_kernel_path,
    dequantize_model,
    dequantize_weight,
    describe_cpu_4bit_kernels,
    is_packed_for_cpu,
    merge_adapter_into_dequantized_model,
    packed_4bit_cpu_kernel_available,
    packed_4bit_layout_fits,
    prepare_for_kbit_training,
)


bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from modeling_deepseekmoe.footprint import measured_footprint, memory_footprint  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")
CONFIGS = {
    "nf4": BitsAndBytesConfig(**NF4),
    "nf4-dq": BitsAndBytesConfig(**NF4, bnb_4bit_use_double_quant=True),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}
# Observed on the tiny random model (5 batches): relative L2 error of the logits vs the fp32 model
# 0.065-0.098 for nf4 (with or without double quant) and 0.005-0.007 for 8-bit.
LOGITS_RELATIVE_TOLERANCE = {"nf4": 0.2, "nf4-dq": 0.2, "int8": 0.02}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("quantization") / "released"
    return write_random_released_checkpoint(tiny_config(), directory, dtype=torch.float32, max_shard_bytes=20_000)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def quantized(checkpoint):
    load = AutoModelForCausalLM.from_pretrained
    return {name: load(checkpoint, quantization_config=q) for name, q in CONFIGS.items()}


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def moe_blocks(model) -> list[DeepseekMoESparseMoeBlock]:
    return [m for m in model.modules() if isinstance(m, DeepseekMoESparseMoeBlock)]


def logits(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


# --------------------------------------------------------------------------------------------------------------------
# What gets quantized


def assert_quantized(weight, precision: str) -> None:
    if precision == "int8":
        assert type(weight) is bnb.nn.Int8Params and weight.dtype == torch.int8 and weight.SCB is not None
    else:
        assert type(weight) is bnb.nn.Params4bit and weight.dtype == torch.uint8 and weight.bnb_quantized
        assert weight.quant_state.quant_type == "nf4"
        assert weight.quant_state.nested == (precision == "nf4-dq")


@pytest.mark.parametrize("precision", list(CONFIGS))
def test_every_expert_and_projection_is_quantized(quantized, precision):
    model = quantized[precision]
    linear_class = bnb.nn.Linear8bitLt if precision == "int8" else bnb.nn.Linear4bit
    blocks = moe_blocks(model)
    assert len(blocks) == 2
    for block in blocks:
        experts = block.experts
        assert isinstance(experts, DeepseekMoEQuantizedExperts) and experts.num_experts == 8
        for _, name, projection in experts.projections():
            assert_quantized(projection.weight, precision)
            expected = (32, 16) if name == "down" else (16, 32)
            assert (projection.out_features, projection.in_features) == expected
            assert not isinstance(projection, nn.Linear)  # hidden from PEFT's all-linear / target_modules
        for linear in (block.shared_experts.gate_proj, block.shared_experts.up_proj, block.shared_experts.down_proj):
            assert isinstance(linear, linear_class)
            assert_quantized(linear.weight, precision)
        assert type(block.gate.weight) is nn.Parameter and block.gate.weight.dtype == torch.float32
    dense_mlp = model.model.layers[0].mlp
    assert isinstance(dense_mlp, DeepseekMoEMLP)
    for layer in model.model.layers:
        attention = layer.self_attn
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            assert isinstance(linear, linear_class)
            assert_quantized(linear.weight, precision)
    for linear in (dense_mlp.gate_proj, dense_mlp.up_proj, dense_mlp.down_proj):
        assert isinstance(linear, linear_class)

    # Everything else stays a plain parameter in the compute dtype: routers, norms, embeddings, lm_head.
    plain = {name for name, p in model.named_parameters() if type(p) is nn.Parameter}
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if name in plain)
    expected_plain = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    norms = ("input_layernorm", "post_attention_layernorm")
    expected_plain |= {f"model.layers.{index}.{norm}.weight" for index in range(3) for norm in norms}
    expected_plain |= {f"model.layers.{index}.mlp.gate.weight" for index in (1, 2)}
    assert plain == expected_plain
    assert type(model.lm_head) is nn.Linear
    assert model.config.quantization_config.llm_int8_skip_modules is None  # transformers' default: lm_head skipped


def test_skip_modules_keep_those_experts_dense(checkpoint, input_ids, tmp_path):
    q = BitsAndBytesConfig(**NF4, llm_int8_skip_modules=["lm_head", "model.layers.2.mlp.experts"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=q)
    layer1, layer2 = (layer.mlp for layer in model.model.layers[1:])
    assert isinstance(layer1.experts, DeepseekMoEQuantizedExperts)
    assert type(layer2.experts) is DeepseekMoEExperts and layer2.experts.gate_up_proj.shape == (8, 32, 32)
    assert isinstance(layer2.shared_experts.up_proj, bnb.nn.Linear4bit)
    assert type(layer1.gate.weight) is nn.Parameter and type(model.lm_head) is nn.Linear  # never converted
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded.model.layers[2].mlp.experts) is DeepseekMoEExperts
    assert torch.equal(logits(reloaded, input_ids), logits(model, input_ids))


# --------------------------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("precision", list(CONFIGS))
def test_logits_close_to_full_precision(reference, quantized, input_ids, precision):
    expected = logits(reference, input_ids)
    error = (logits(quantized[precision], input_ids) - expected).norm() / expected.norm()
    assert error < LOGITS_RELATIVE_TOLERANCE[precision], f"{precision}: relative logits error {error:.4f}"


@pytest.mark.parametrize("precision", ["nf4", "nf4-dq"])
def test_4bit_forward_equals_dequantized_model(quantized, input_ids, precision):
    # Exactly, with bitsandbytes' packed kernel (bf16 compute, AVX512-BF16 CPUs) off: see the CPU kernel tests below.
    model = copy.deepcopy(quantized[precision])
    configure_4bit_cpu_kernels(model, packed=False)
    dense = dequantize_model(copy.deepcopy(model))
    assert not any(isinstance(m, (DeepseekMoEQuantizedExperts, bnb.nn.Linear4bit)) for m in dense.modules())
    assert not dense.is_quantized and not hasattr(dense.config, "quantization_config")
    assert torch.equal(logits(model, input_ids), logits(dense, input_ids))


def test_transformers_dequantize_covers_the_experts(quantized, input_ids):
    model = copy.deepcopy(quantized["nf4"])
    expected = logits(dequantize_model(copy.deepcopy(model)), input_ids)
    model.dequantize()
    assert not any(isinstance(m, (DeepseekMoEQuantizedExperts, bnb.nn.Linear4bit)) for m in model.modules())
    assert torch.equal(logits(model, input_ids), expected)


def test_8bit_experts_forward_equals_dequantized_experts(quantized, input_ids):
    # LLM.int8 attention also quantizes activations; the experts are weight-only 8-bit: compare with them dequantized.
    model = quantized["int8"]
    dense_experts = copy.deepcopy(model)
    for block in moe_blocks(dense_experts):
        block.experts = block.experts.to_dense()
    assert torch.equal(logits(model, input_ids), logits(dense_experts, input_ids))


def routed_inputs(hidden_size: int, tokens: int = 10, num_experts: int = 8, top_k: int = 3, seed: int = 1):
    """(hidden states, top-k expert ids, top-k weights) of `tokens` randomly routed tokens."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    top_k_index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    return hidden, top_k_index, torch.rand(tokens, top_k, generator=generator)


def assert_same_forward_and_backward(experts, dense, hidden, top_k_index, top_k_weights) -> None:
    """`experts` computes exactly what `dense` does: output and the gradients of the inputs and routing weights."""
    results = []
    for module in (experts, dense):
        states, weights = hidden.clone().requires_grad_(), top_k_weights.clone().requires_grad_()
        output = module(states, top_k_index, weights)
        output.pow(2).sum().backward()
        results.append((output.detach(), states.grad, weights.grad))
    for quantized_result, dense_result in zip(*results):
        assert torch.equal(quantized_result, dense_result)


@pytest.mark.parametrize("implementation", ["auto", "eager", "sorted_loop", "grouped_mm"])
@pytest.mark.parametrize("precision", ["nf4-dq", "int8"])
def test_quantized_experts_match_dense_forward_and_backward(quantized, implementation, precision):
    experts = moe_blocks(quantized[precision])[0].experts
    dense = experts.to_dense()
    saved = experts.config._experts_implementation
    experts.config._experts_implementation = implementation
    try:
        assert_same_forward_and_backward(experts, dense, *routed_inputs(hidden_size=32))
    finally:
        experts.config._experts_implementation = saved
    gate_up, down = experts.dequantize_expert(3)
    assert torch.equal(gate_up, dense.gate_up_proj[3]) and torch.equal(down, dense.down_proj[3])


def test_generate(quantized, input_ids):
    prompt = input_ids[:1, :5]
    for precision in ("nf4-dq", "int8"):
        model = quantized[precision]
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        assert output.shape == (1, 11) and torch.equal(output[:, :5], prompt)


# --------------------------------------------------------------------------------------------------------------------
# Memory


def quantized_matrix_elements(config) -> int:
    table = memory_footprint(config)
    return sum(out * inp for c in table.components if c.quantized for out, inp in c.matrices)


@pytest.mark.parametrize("precision", list(CONFIGS))
def test_memory_footprint_drops_by_the_expected_factor(checkpoint, precision):
    config = tiny_config()
    full = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    q = CONFIGS[precision]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, quantization_config=q)
    quantized_elements = quantized_matrix_elements(config)
    bytes_per_element = 1 if precision == "int8" else 0.5
    # get_memory_footprint counts parameters and buffers: each quantized weight shrinks from 2 bytes to 1 or 0.5.
    expected = full.get_memory_footprint() - int((2 - bytes_per_element) * quantized_elements)
    assert model.get_memory_footprint() == expected
    experts = moe_blocks(model)[0].experts
    expert_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
    assert expert_bytes == bytes_per_element * 8 * 3 * 32 * 16
    # The computed table matches what the model really holds, bitsandbytes statistics included.
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    table = memory_footprint(config)
    assert measured_footprint(full) - buffers == table.bytes("bf16")
    assert measured_footprint(model) - buffers == table.bytes(precision)


def test_16b_footprint_table():
    table = memory_footprint(DeepseekMoEConfig())
    assert 16.3e9 < table.parameters < 16.45e9
    assert table.bits_per_weight("nf4-dq", "routed experts") == pytest.approx(4.13, abs=0.01)
    assert table.bits_per_weight("nf4", "routed experts") == pytest.approx(4.5, abs=0.01)
    assert table.bytes("bf16") / 1e9 == pytest.approx(32.75, abs=0.01)
    assert table.bytes("nf4-dq") < 9.2e9  # weights of the "under 11 GB" 4-bit target
    assert table.bytes("bf16", "embeddings + lm_head") == table.bytes("nf4-dq", "embeddings + lm_head")


def test_memory_benchmark_without_gpu_writes_the_computed_table(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import memory
    finally:
        sys.path.pop(0)
    path = memory.run(tiny_config(), "cpu", results_dir=tmp_path)
    assert path == tmp_path / "memory_cpu_computed.md"
    assert "| routed experts |" in path.read_text()
    assert "Skipped the measurement" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# Saving


@pytest.mark.parametrize("precision", ["nf4-dq", "int8"])
def test_save_and_reload_round_trip(quantized, input_ids, tmp_path, precision):
    model = quantized[precision]
    model.save_pretrained(tmp_path / "first")
    names = set(checkpoint_tensor_files(tmp_path / "first"))
    released = set(released_tensor_shapes(tiny_config()))
    assert released <= names  # the released per-expert names, plus bitsandbytes' statistics
    statistics = {name.rpartition(".weight")[0] for name in names - released if ".weight." in name}
    statistics |= {name.rpartition(".")[0] for name in names - released if name.endswith(("SCB", "weight_format"))}
    assert statistics and all(f"{prefix}.weight" in released for prefix in statistics)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "first")
    for (name, before), after in zip(model.named_parameters(), reloaded.parameters()):
        assert type(before) is type(after) and torch.equal(before, after), name
    expert_before = moe_blocks(model)[1].experts.expert(5).down.weight
    expert_after = moe_blocks(reloaded)[1].experts.expert(5).down.weight
    if precision == "int8":
        assert torch.equal(expert_before.SCB, expert_after.SCB)
    else:
        assert torch.equal(expert_before.quant_state.absmax, expert_after.quant_state.absmax)
    assert torch.equal(logits(reloaded, input_ids), logits(model, input_ids))
    reloaded.save_pretrained(tmp_path / "second")  # a reloaded quantized model saves again
    assert set(checkpoint_tensor_files(tmp_path / "second")) == names


# --------------------------------------------------------------------------------------------------------------------
# k-bit training, QLoRA, merging


def load_bf16_4bit(checkpoint):
    q = BitsAndBytesConfig(**NF4, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, quantization_config=q)


def test_prepare_for_kbit_training_keeps_routers_in_compute_dtype(checkpoint, input_ids):
    model = prepare_for_kbit_training(load_bf16_4bit(checkpoint))
    for block in moe_blocks(model):
        assert block.gate.weight.dtype == torch.bfloat16 and not block.gate.weight.requires_grad
    # PEFT's own choices are kept: norms and embeddings in fp32, so the activations are fp32 ...
    assert model.model.layers[1].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    # ... but the routers score in bf16, as at inference.
    with torch.no_grad():
        output = model(input_ids, output_router_logits=True)
    assert all(router_logits.dtype == torch.bfloat16 for router_logits in output.router_logits)


def test_peft_all_linear_leaves_routed_experts_alone(checkpoint, input_ids):
    model = peft.get_peft_model(load_bf16_4bit(checkpoint), peft.LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert not any(".mlp.experts." in name for name in wrapped)
    assert any(".mlp.shared_experts." in name for name in wrapped)
    assert any("self_attn.q_proj" in name for name in wrapped)
    assert logits(model, input_ids).shape == (2, 12, 96)


def test_qlora_gradients_equal_those_of_the_dequantized_model(quantized, input_ids):
    # Through the quantized experts (dequantized again in the backward) and transformers' gradient checkpointing.
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj", "down_proj"], init_lora_weights=False)
    gradients = []
    base = quantized["nf4"]
    for model in (prepare_for_kbit_training(copy.deepcopy(base)), dequantize_model(copy.deepcopy(base))):
        torch.manual_seed(0)
        model = peft.get_peft_model(model, copy.deepcopy(lora))
        model.train()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    # q_proj and o_proj in 3 layers, down_proj of the dense MLP and of 2 shared experts; lora_A and lora_B each
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == (3 * 2 + 3) * 2
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradient, gradients[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_qlora_trains_and_merges_into_a_released_bf16_checkpoint(checkpoint, input_ids, tmp_path):
    model = prepare_for_kbit_training(load_bf16_4bit(checkpoint))
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert any("layers.0.mlp.gate_proj" in n for n in wrapped)
    assert any("shared_experts.down_proj" in n for n in wrapped)
    assert not any(".mlp.experts." in name for name in wrapped)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses

    model.eval()
    adapter_logits = logits(model, input_ids)
    merged = merge_adapter_into_dequantized_model(model, dtype=torch.bfloat16)
    assert not any(isinstance(m, (DeepseekMoEQuantizedExperts, bnb.nn.Linear4bit)) for m in merged.modules())
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    merged.save_pretrained(tmp_path)

    files = checkpoint_tensor_files(tmp_path)
    shapes = {}
    for file_name in set(files.values()):
        shapes.update(read_tensor_shapes(os.path.join(tmp_path, file_name)))
    assert shapes == released_tensor_shapes(tiny_config())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16
    reloaded_logits = logits(reloaded, input_ids)
    assert torch.equal(reloaded_logits, logits(merged, input_ids))
    # Observed max |diff| 2.5e-3 - 4e-3 on logits of magnitude ~0.6: the adapter model runs norms and embeddings in
    # fp32 (PEFT's k-bit preparation) and adds the LoRA product unmerged; the checkpoint is plain bf16.
    torch.testing.assert_close(reloaded_logits, adapter_logits, atol=2e-2, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# CPU 4-bit kernels: bitsandbytes' packed AVX512-BF16 kernel where the shape fits, dequantize + matmul elsewhere.
# Both branches run on every CPU kind: the switch is checked with the kernel available and not, the packing (torch
# code) and unpacking anywhere; the packed kernel itself only runs where the CPU has it (PACKED_HERE).

PACKED_HERE = packed_4bit_cpu_kernel_available()
QUALIFYING, REFUSED = (32, 64), (48, 32)  # (out, in): the packed layout takes the first, not the second
# The tiny model of the kernel tests has both kinds in attention / MLPs and in the routed experts:
# attention 64x64 and expert / shared gate, up 32x64 fit; expert / shared down 64x32 and the dense MLP 48x64 / 64x48 don't.
MIXED_DIMS = {"hidden_size": 64, "moe_intermediate_size": 32, "intermediate_size": 48, "n_shared_experts": 1}
# Observed relative L2 error of the packed kernel (bf16 compute) vs the fp32 dequantized reference: 3e-3 per layer,
# 4e-3 - 5e-3 on the mixed model's logits and routed experts (nf4 and nf4-dq).
PACKED_RELATIVE_TOLERANCE = 2e-2


def nf4_linear(out_features, in_features, double_quant=False, seed=0):
    """(Linear4bit in eval mode, the fp32 weight it quantizes)."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    linear = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    linear.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant, module=linear
    )._quantize("cpu")
    return linear.eval(), weight


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("quantization") / "mixed"
    write_random_released_checkpoint(tiny_config(**MIXED_DIMS), directory, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=CONFIGS["nf4-dq"])


def test_packed_layout_fits_exactly_the_shapes_bitsandbytes_can_pack():
    for shape in [(2048, 1408), (1408, 2048), (2816, 2048), (2048, 2816), (2048, 10944), QUALIFYING]:
        assert packed_4bit_layout_fits(*shape), shape
    for shape in [REFUSED, (48, 64), (32, 32), (32, 96)]:
        assert not packed_4bit_layout_fits(*shape), shape
    # bitsandbytes' repacking (torch code, on any CPU) takes the first and crashes on the others
    for shape in [QUALIFYING, (64, 128), REFUSED, (48, 64), (32, 32), (32, 96)]:
        linear, _ = nf4_linear(*shape)
        try:
            quantization._pack_for_cpu(linear.weight, linear)
            packed = True
        except (AssertionError, RuntimeError):
            packed = False
        assert packed == packed_4bit_layout_fits(*shape), shape


@pytest.mark.parametrize("kernel_available", [True, False])
@pytest.mark.parametrize("shape", [QUALIFYING, REFUSED])
def test_packed_kernel_switch_per_linear4bit(monkeypatch, shape, kernel_available):
    monkeypatch.setattr(quantization, "packed_4bit_cpu_kernel_available", lambda: kernel_available)
    linear, _ = nf4_linear(*shape)
    configure_4bit_cpu_kernels(linear)
    takes_it = kernel_available and shape == QUALIFYING
    assert linear.support_avx512bf16_for_cpu == takes_it
    # Without the packed kernel, the own one takes inference calls of a few rows where it builds (in % 64 == 0).
    own = not kernel_available and shape[1] % 64 == 0 and quantization.own_4bit_cpu_kernel_available()
    assert linear.own_kernel == own
    expected = PACKED_KERNEL_PATH if takes_it else DEQUANTIZE_KERNEL_PATH
    assert cpu_4bit_kernel_path(linear) == expected if not own else cpu_4bit_kernel_path(linear).startswith(
        quantization.OWN_KERNEL_PATH
    )
    configure_4bit_cpu_kernels(linear, packed=False)
    assert not linear.support_avx512bf16_for_cpu and not linear.own_kernel
    assert cpu_4bit_kernel_path(linear) == DEQUANTIZE_KERNEL_PATH


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [QUALIFYING, REFUSED, (32, 96), (64, 128)])
def test_linear4bit_inference_equals_the_dequantized_reference(shape, double_quant):
    linear, weight = nf4_linear(*shape, double_quant)
    configure_4bit_cpu_kernels(linear)
    reference = dequantize_weight(linear.weight, torch.float32)
    assert relative_error(reference, weight) < 0.12  # NF4's error on Gaussian weights: 0.09
    # More rows than the own kernel takes: the dequantizing path, exact where it runs.
    x = torch.randn(quantization.CPU_KERNEL_MAX_ROWS + 1, shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = linear(x)
    packed = PACKED_HERE and packed_4bit_layout_fits(*shape)
    assert is_packed_for_cpu(linear.weight) == packed
    if packed:  # the kernel computes in bf16
        assert relative_error(output, F.linear(x, reference)) < PACKED_RELATIVE_TOLERANCE
    else:
        assert torch.equal(output, F.linear(x, reference))


@pytest.mark.parametrize("double_quant", [False, True])
def test_packed_weight_unpacks_exactly_for_saving_and_training(double_quant):
    linear, _ = nf4_linear(*QUALIFYING, double_quant)
    configure_4bit_cpu_kernels(linear)
    before = {name: value.clone() for name, value in linear.state_dict().items()}
    reference = dequantize_weight(linear.weight)
    x = torch.randn(5, QUALIFYING[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        linear(x)  # packs the weight on AVX512-BF16 CPUs; elsewhere pack it as such a CPU would
    if not PACKED_HERE:
        quantization._pack_for_cpu(linear.weight, linear)
    assert is_packed_for_cpu(linear.weight)
    assert torch.equal(dequantize_weight(linear.weight), reference)
    # bitsandbytes' own unpacking loses the scales of a weight without double quantization, and re-quantizes the others
    saved = linear.state_dict()
    assert not is_packed_for_cpu(linear.weight)
    assert saved.keys() == before.keys() and all(torch.equal(saved[name], before[name]) for name in before)

    # A packed layer passes no gradient to its input: a training call after an inference call unpacks it.
    if not PACKED_HERE:
        quantization._pack_for_cpu(linear.weight, linear)
    elif not is_packed_for_cpu(linear.weight):
        with torch.no_grad():
            linear(x)
    assert is_packed_for_cpu(linear.weight)
    linear.train()
    inputs = x.clone().requires_grad_()
    linear(inputs).pow(2).sum().backward()
    assert not is_packed_for_cpu(linear.weight)
    expected_inputs = x.clone().requires_grad_()
    F.linear(expected_inputs, reference).pow(2).sum().backward()
    torch.testing.assert_close(inputs.grad, expected_inputs.grad)


def test_dequantize_weight_is_right_when_blocks_span_rows():
    # bitsandbytes 0.50's AVX512 dequantize kernel reads one scale per (row, block): wrong for these shapes there.
    for shape in [(16, 32), (32, 96), (6, 32)]:
        linear, _ = nf4_linear(*shape)
        one_row = copy.copy(linear.weight.quant_state)
        one_row.shape = torch.Size([1, shape[0] * shape[1]])  # the same blocks, none spanning rows
        expected = bnb.functional.dequantize_4bit(linear.weight.data, one_row).reshape(shape)
        assert torch.equal(dequantize_weight(linear.weight), expected), shape
        configure_4bit_cpu_kernels(linear)
        x = torch.randn(3, shape[1])
        with torch.no_grad():
            assert torch.equal(linear(x), F.linear(x, expected)), shape


def test_both_kinds_of_shape_in_the_tiny_model_get_their_kernel(mixed):
    linears = [module for module in mixed.modules() if isinstance(module, bnb.nn.Linear4bit)]
    fits = {module: packed_4bit_layout_fits(module.out_features, module.in_features) for module in linears}
    assert set(fits.values()) == {True, False}
    for module, fit in fits.items():
        assert module.support_avx512bf16_for_cpu == (PACKED_HERE and fit)
    for block in moe_blocks(mixed):
        experts = block.experts
        assert experts.packed_kernels == PACKED_HERE
        for _, name, projection in experts.projections():
            assert isinstance(projection, DeepseekMoEExpertWeight)
            assert projection.packed_kernel == (PACKED_HERE and name != "down")
            assert cpu_4bit_kernel_path(projection) == cpu_4bit_kernel_path(
                (projection.out_features, projection.in_features)
            )


def test_mixed_model_inference_matches_the_dequantized_model(mixed, input_ids):
    model = copy.deepcopy(mixed)
    expected = logits(dequantize_model(copy.deepcopy(mixed)), input_ids)
    actual = logits(model, input_ids)
    packed = [weight for weight in model.parameters() if is_packed_for_cpu(weight)]
    if PACKED_HERE:  # attention, shared and routed experts' gate / up
        assert packed and relative_error(actual, expected) < PACKED_RELATIVE_TOLERANCE
    elif quantization.own_4bit_cpu_kernel_available():  # the dequantized weight's products, summed in another order
        assert not packed
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    else:
        assert not packed and torch.equal(actual, expected)
    # The state dict after an inference call is the loaded one (and the model still computes the same).
    fresh = {name: value.clone() for name, value in copy.deepcopy(mixed).state_dict().items()}
    saved = model.state_dict()
    assert saved.keys() == fresh.keys() and all(torch.equal(saved[name], fresh[name]) for name in fresh)
    assert torch.equal(logits(model, input_ids), actual)
    configure_4bit_cpu_kernels(model, packed=False)
    assert torch.equal(logits(model, input_ids), expected)
    output = mixed.generate(input_ids[:1, :5], attention_mask=torch.ones(1, 5), max_new_tokens=4, do_sample=False)
    assert output.shape == (1, 9)


def test_routed_experts_inference_loop_then_training(mixed):
    experts = copy.deepcopy(moe_blocks(mixed)[0].experts)
    dense = experts.to_dense()
    hidden, top_k_index, top_k_weights = routed_inputs(hidden_size=64)
    with torch.no_grad():
        expected = dense(hidden, top_k_index, top_k_weights)
        if PACKED_HERE:
            output = experts.eval()(hidden, top_k_index, top_k_weights)
            assert relative_error(output, expected) < PACKED_RELATIVE_TOLERANCE
            assert is_packed_for_cpu(experts.expert(int(top_k_index[0, 0])).gate.weight)
        # The same loop with every projection dequantized (what it does for the shapes the kernel refuses).
        loop = copy.deepcopy(experts)
        for _, _, projection in loop.projections():
            projection.unpack()
            projection.packed_kernel = False
        torch.testing.assert_close(loop.eval()(hidden, top_k_index, top_k_weights), expected, rtol=1e-6, atol=1e-6)
    # A call that needs gradients runs on the plain weights again, exactly as the dense experts do.
    assert_same_forward_and_backward(experts, dense, hidden, top_k_index, top_k_weights)
    assert not any(is_packed_for_cpu(projection.weight) for _, _, projection in experts.projections())


def test_kernel_path_descriptions(monkeypatch):
    own = not PACKED_HERE and quantization.own_4bit_cpu_kernel_available()
    fallback = quantization.OWN_KERNEL_PATH if own else DEQUANTIZE_KERNEL_PATH
    assert cpu_4bit_kernel_path((2048, 1408)).startswith(PACKED_KERNEL_PATH if PACKED_HERE else fallback)
    assert cpu_4bit_kernel_path(REFUSED) == DEQUANTIZE_KERNEL_PATH  # in 32: blocks span rows
    line = describe_cpu_4bit_kernels()
    assert line.startswith(PACKED_KERNEL_PATH if PACKED_HERE else fallback) and "\n" not in line
    monkeypatch.setattr(quantization, "is_bitsandbytes_available", lambda: False)
    assert "bitsandbytes is not installed" in describe_cpu_4bit_kernels()


def test_bitsandbytes_kernels_notice_is_dropped_and_its_other_warnings_kept():
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def shown(message: str) -> bool:
        return bool(logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 1, message, (), None)))

    assert not shown("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...")
    assert shown("Some other bitsandbytes warning")
    # bitsandbytes logs the notice when it is imported (on AVX512-BF16 CPUs without `kernels`); peft imports it.
    code = "import modeling_deepseekmoe, peft, bitsandbytes"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "kernels-community" not in result.stderr


# --------------------------------------------------------------------------------------------------------------------
# Errors


def test_shortcut_flags_get_a_clear_error(checkpoint):
    with pytest.raises(TypeError, match=r"quantization_config=BitsAndBytesConfig\(load_in_4bit=True\)"):
        AutoModelForCausalLM.from_pretrained(checkpoint, load_in_4bit=True)


@pytest.mark.parametrize(
    "quantization_config, message",
    [
        ({"quant_method": "awq", "bits": 4}, "'awq' is not supported.*routed experts"),
        (BitsAndBytesConfig(), "neither load_in_4bit nor load_in_8bit"),
    ],
)
def test_unsupported_quantization_configs_are_refused(checkpoint, quantization_config, message):
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quantization_config)


def test_missing_bitsandbytes_is_reported(checkpoint, monkeypatch):
    monkeypatch.setattr(quantization, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(ImportError, match=r"needs bitsandbytes.*pip install"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=CONFIGS["nf4"])


def test_dequantize_model_refuses_adapter_layers(checkpoint):
    model = peft.get_peft_model(load_bf16_4bit(checkpoint), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_adapter_into_dequantized_model"):
        dequantize_model(model)


REPO_ROOT = Path(__file__).resolve().parents[1]


def bitsandbytes_config_calls() -> list[str]:
    """Every `BitsAndBytesConfig(...)` call in the project's code outside the tests, as "path:line"."""
    calls = []
    for path in sorted(REPO_ROOT.rglob("*.py")):
        relative = path.relative_to(REPO_ROOT)
        if relative.parts[0] == "tests" or any(part.startswith(".") or part.endswith(".egg-info")
                                               for part in relative.parts):  # fmt: skip
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Call):
                function = node.func
                name = getattr(function, "id", None) or getattr(function, "attr", None)
                if name == "BitsAndBytesConfig":
                    calls.append(f"{relative}:{node.lineno}")
    return calls


def test_one_bitsandbytes_config_builder_in_the_tree():
    """Every command, library function and benchmark means the same by 4-bit / 8-bit: the config is built in
    `modeling_deepseekmoe.loading.quantization_config` only."""
    calls = bitsandbytes_config_calls()
    assert calls and all(call.startswith("modeling_deepseekmoe/loading.py:") for call in calls), calls
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.memory import quantization_config
    from modeling_deepseekmoe.loading import QuantizationArguments

    as_flags = {"int8": QuantizationArguments(load_in_8bit=True),
                "nf4": QuantizationArguments(load_in_4bit=True, use_bnb_nested_quant=False),
                "nf4-dq": QuantizationArguments(load_in_4bit=True)}  # fmt: skip
    assert quantization_config("bf16") is None
    for precision, flags in as_flags.items():
        assert quantization_config(precision).to_dict() == flags.bnb_config(dtype="bfloat16").to_dict(), precision
    assert quantization_config("nf4").bnb_4bit_compute_dtype == torch.bfloat16
