import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from deepseekmoe.finetune.expert_lora import ExpertsLoraLayer
from deepseekmoe.finetune.lora import build_lora_config, load_lora_adapter, merge_lora
from modeling_deepseekmoe import DeepseekMoEForCausalLM

from conftest import tiny_config


def base_model(**overrides):
    torch.manual_seed(0)
    return DeepseekMoEForCausalLM(tiny_config(**overrides)).eval()


def random_ids(batch=2, length=9, seed=1):
    return torch.randint(2, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def lora_model(target, seed=3, **kwargs):
    model = base_model()
    torch.manual_seed(seed)
    # Non-zero B so the adapter changes the outputs from the first step.
    return get_peft_model(model, build_lora_config(target, init_lora_weights=False, **kwargs))


def test_expert_lora_wraps_fused_experts_and_never_the_router():
    model = lora_model("all")
    wrapped = {name for name, module in model.named_modules() if isinstance(module, ExpertsLoraLayer)}
    assert wrapped == {"base_model.model.model.layers.1.mlp.experts", "base_model.model.model.layers.2.mlp.experts"}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not any("mlp.gate." in name for name in trainable)


@pytest.mark.parametrize("experts_implementation", ["auto", "eager"])
def test_unmerged_expert_lora_equals_merged_weights(experts_implementation):
    model = lora_model(["experts", "attention"])
    model.base_model.model.set_experts_implementation(experts_implementation)
    ids = random_ids()
    with torch.no_grad():
        adapted = model(ids).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)
    merged = merge_lora(model)
    assert not any(isinstance(m, ExpertsLoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    assert base is merged


def test_selected_experts_only_change_and_adapter_round_trips(tmp_path):
    selection = {1: [2, 5], 2: [0]}
    model = lora_model("experts", expert_ids=selection)
    ids = random_ids()
    adapted = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = load_lora_adapter(base_model(), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids).logits, adapted, atol=1e-6, rtol=1e-6)

    before = base_model()
    merged = merge_lora(reloaded)
    for layer in (1, 2):
        changed = (merged.model.layers[layer].mlp.experts.gate_up_proj
                   != before.model.layers[layer].mlp.experts.gate_up_proj).flatten(1).any(dim=1)
        assert changed.nonzero().flatten().tolist() == selection[layer]


def test_loading_an_expert_lora_adapter_is_silent_and_keeps_its_selection(tmp_path):
    selection = {1: [2, 5], 2: [0]}
    lora_model("experts", expert_ids=selection).save_pretrained(tmp_path / "selected")
    lora_model(["attention", "experts"]).save_pretrained(tmp_path / "every_expert")
    assert json.loads((tmp_path / "selected" / "adapter_config.json").read_text())["expert_ids"] == {
        "1": [2, 5], "2": [0]}  # fmt: skip
    # Without a selection the file is a plain LoraConfig: PEFT's own reader takes it as it is.
    assert "expert_ids" not in json.loads((tmp_path / "every_expert" / "adapter_config.json").read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert LoraConfig.from_pretrained(str(tmp_path / "every_expert")).r == 8
        selected = load_lora_adapter(base_model(), tmp_path / "selected")
        every = load_lora_adapter(base_model(), tmp_path / "every_expert")
    assert not [str(warning.message) for warning in caught]
    assert selected.peft_config["default"].expert_ids == selection
    assert every.peft_config["default"].expert_ids is None
    experts = every.base_model.model.model.layers[1].mlp.experts
    assert isinstance(experts, ExpertsLoraLayer) and experts.lora_expert_ids["default"].tolist() == list(range(8))


def test_layer_restriction_and_gradients_reach_only_lora(tmp_path):
    model = lora_model(["experts", "shared_experts"], layers=[2], lora_dropout=0.1)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, ExpertsLoraLayer)]
    assert wrapped == ["base_model.model.model.layers.2.mlp.experts"]
    model.train()
    ids = random_ids()
    model(ids, labels=ids).loss.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in name and "layers.2." in name for name in grads)
    assert any("experts.lora_A" in name for name in grads) and any("shared_experts" in name for name in grads)


def test_expert_lora_trains_a_toy_task():
    model = get_peft_model(base_model(), build_lora_config("experts", r=4, lora_alpha=8))
    model.train()
    ids = random_ids(4, 12)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2


def test_unknown_target_and_empty_selection_are_refused():
    with pytest.raises(ValueError, match="Unknown LoRA target 'routers'"):
        build_lora_config("routers")
    with pytest.raises(ValueError, match="No experts selected for LoRA in .*layers.2.mlp.experts"):
        get_peft_model(base_model(), build_lora_config("experts", expert_ids={1: [0]}))


def test_grouped_gpu_projection_path_equals_the_cpu_loop():
    model = lora_model("experts", expert_ids={1: [1, 3, 6], 2: [0, 7]})
    layer = model.base_model.model.model.layers[1].mlp.experts
    counts = torch.tensor([3, 0, 2, 4, 1, 0, 5, 2])
    rows = torch.randn(int(counts.sum()), 32, requires_grad=True)
    for which in ("gate_up", "down"):
        inputs = rows if which == "gate_up" else rows.new_ones(1).expand(rows.shape[0], 16) * rows[:, :16]
        looped = layer._project(["default"], which, inputs, counts, grouped=False)
        grouped = layer._project(["default"], which, inputs, counts, grouped=True)
        torch.testing.assert_close(grouped, looped, atol=1e-5, rtol=1e-5)
        (grad_looped,) = torch.autograd.grad(looped.sum(), layer.lora_A["default"].gate_up if which == "gate_up"
                                             else layer.lora_A["default"].down)
        (grad_grouped,) = torch.autograd.grad(grouped.sum(), layer.lora_A["default"].gate_up if which == "gate_up"
                                              else layer.lora_A["default"].down)
        torch.testing.assert_close(grad_grouped, grad_looped, atol=1e-5, rtol=1e-5)


def test_qlora_on_quantized_routed_experts_equals_the_dequantized_model(released_checkpoint):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from modeling_deepseekmoe.quantization import (
        DeepseekMoEQuantizedExperts,
        configure_4bit_cpu_kernels,
        dequantize_model,
    )

    quantized = AutoModelForCausalLM.from_pretrained(
        released_checkpoint, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    # bitsandbytes' packed AVX512-BF16 kernel computes in bf16: compare on the exact dequantizing path.
    configure_4bit_cpu_kernels(quantized, packed=False)
    assert isinstance(quantized.model.layers[1].mlp.experts, DeepseekMoEQuantizedExperts)
    dense = dequantize_model(AutoModelForCausalLM.from_pretrained(
        released_checkpoint, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ))
    config = dict(target="experts", expert_ids={1: [0, 4], 2: [3]}, init_lora_weights=False)
    torch.manual_seed(5)
    adapted_quantized = get_peft_model(quantized, build_lora_config(**config))
    torch.manual_seed(5)
    adapted_dense = get_peft_model(dense, build_lora_config(**config))
    ids = random_ids()
    out_q, out_d = adapted_quantized(ids, labels=ids), adapted_dense(ids, labels=ids)
    torch.testing.assert_close(out_q.logits, out_d.logits, atol=1e-5, rtol=1e-5)
    out_q.loss.backward()
    out_d.loss.backward()
    grad = lambda m: m.base_model.model.model.layers[1].mlp.experts.lora_A["default"].gate_up.grad  # noqa: E731
    torch.testing.assert_close(grad(adapted_quantized), grad(adapted_dense), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="dequantize the base first"):
        adapted_quantized.merge_and_unload()
