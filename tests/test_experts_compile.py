"""The default experts implementation ("auto") under `torch.compile(fullgraph=True)` and `torch.export`, and the
module calls the expert paths make (the same on every rank whatever the routing, as DeepSpeed ZeRO-3 requires).
Tiny model, CPU."""

import copy

import pytest
import torch

from modeling_deepseekmoe import DeepseekMoEForCausalLM
from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoESparseMoeBlock

from conftest import tiny_config


def make_model(**overrides):
    torch.manual_seed(0)
    model = DeepseekMoEForCausalLM(tiny_config(**overrides))
    assert model.config._experts_implementation == "auto"
    return model


def random_ids(batch=2, length=8, seed=1):
    return torch.randint(2, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def test_default_experts_compile_fullgraph_in_eval():
    model = make_model().eval()
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        actual = compiled(ids, use_cache=False).logits
    assert_close(actual, expected, "compiled eval logits")


def test_default_experts_compile_fullgraph_forward_and_backward():
    model = make_model(aux_loss_alpha=0.01).train()
    twin = copy.deepcopy(model)
    ids = random_ids()
    expected = model(ids, labels=ids, use_cache=False)
    expected.loss.backward()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    actual = compiled(ids, labels=ids, use_cache=False)
    actual.loss.backward()
    assert_close(actual.loss, expected.loss, "compiled training loss")
    assert_close(actual.logits, expected.logits, "compiled training logits")
    for (name, param), (_, twin_param) in zip(model.named_parameters(), twin.named_parameters()):
        assert twin_param.grad is not None, f"compiled: {name} got no gradient"
        assert_close(twin_param.grad, param.grad, f"compiled grad of {name}")


def test_default_experts_export():
    model = make_model().eval()
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    exported = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    with torch.no_grad():
        actual = exported.module()(ids, use_cache=False).logits
    assert_close(actual, expected, "exported logits")


def _module_calls(block: DeepseekMoESparseMoeBlock, hidden: torch.Tensor) -> list[str]:
    """Names of the block's submodules in the order their forward ran, over one forward and backward."""
    calls = []
    handles = [
        module.register_forward_hook(lambda module, args, output, name=name: calls.append(name))
        for name, module in block.named_modules()
    ]
    try:
        block(hidden).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.mark.parametrize("hidden_act", ["silu", "gelu"])
@pytest.mark.parametrize("implementation", ["auto", "sorted_loop", "grouped_mm", "batched_mm"])
def test_expert_paths_make_the_same_module_calls_whatever_the_routing(implementation, hidden_act):
    """ZeRO-3 hooks every module and stops when ranks call different ones: an expert path may not call a module
    (e.g. the activation) once per expert that got tokens."""
    config = tiny_config(experts_implementation=implementation, hidden_act=hidden_act)
    block = DeepseekMoESparseMoeBlock(config).train()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.2)
    hidden = torch.randn(1, 6, config.hidden_size, generator=torch.Generator().manual_seed(0))
    concentrated = hidden.abs()
    spread_calls = _module_calls(block, hidden)
    with torch.no_grad():  # every token of `concentrated` (all positive) now picks experts 0, 1 and 2
        spread_hit = block.gate(hidden.reshape(-1, config.hidden_size))[3].unique().numel()
        block.gate.weight.fill_(-1.0)
        block.gate.weight[: config.num_experts_per_tok] = 1.0
        concentrated_hit = block.gate(concentrated.reshape(-1, config.hidden_size))[3].unique().numel()
    assert spread_hit > concentrated_hit == config.num_experts_per_tok
    assert _module_calls(block, concentrated) == spread_calls
