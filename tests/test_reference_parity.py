"""Parity of the native `DeepseekMoESparseMoeBlock` with a re-implementation of the released MoE block
(`benchmarks/reference_moe.py`): outputs in eval and training mode, and every gradient in training mode, for each
experts implementation. Tiny dims, fp32, CPU; fast."""

import pytest
import torch

import modeling_deepseekmoe  # noqa: F401  (registers the "sorted_loop" / "auto" experts implementations)
from benchmarks.reference_moe import ReferenceMoE
from modeling_deepseekmoe import DeepseekMoEConfig
from modeling_deepseekmoe.experts_kernels import _RECYCLED_GRADIENT_MEMORY
from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoESparseMoeBlock


IMPLEMENTATIONS = ["eager", "sorted_loop", "grouped_mm", "batched_mm", "auto"]
ATOL = RTOL = 1e-5


def tiny_config(**overrides) -> DeepseekMoEConfig:
    kwargs = dict(
        hidden_size=32,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=2,
        aux_loss_alpha=0.1,  # large, so the balance-loss gradient is far above the tolerance
        seq_aux=True,
        norm_topk_prob=False,
        vocab_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return DeepseekMoEConfig(**kwargs)


def make_block(config: DeepseekMoEConfig, implementation: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    config._experts_implementation = implementation
    block = DeepseekMoESparseMoeBlock(config)
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(block.gate.weight, a=5**0.5)
        for param in (block.experts.gate_up_proj, block.experts.down_proj):
            param.normal_(0.0, 0.2)
        for linear in (block.shared_experts.gate_proj, block.shared_experts.up_proj, block.shared_experts.down_proj):
            linear.weight.normal_(0.0, 0.2)
    return block.to(dtype)


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_from_block_copies_weights():
    config = tiny_config()
    block = make_block(config, "eager")
    reference = ReferenceMoE.from_block(block)
    inter = config.moe_intermediate_size
    for e, expert in enumerate(reference.experts):
        assert torch.equal(expert.gate_proj.weight, block.experts.gate_up_proj[e, :inter])
        assert torch.equal(expert.up_proj.weight, block.experts.gate_up_proj[e, inter:])
        assert torch.equal(expert.down_proj.weight, block.experts.down_proj[e])
    assert torch.equal(reference.gate.weight, block.gate.weight)
    assert torch.equal(reference.shared_experts.down_proj.weight, block.shared_experts.down_proj.weight)
    assert reference.gate.weight.data_ptr() != block.gate.weight.data_ptr()  # a copy, not shared storage
    # load_from_block into an existing reference gives the same weights
    other = ReferenceMoE(config).load_from_block(block)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(2, 7), (1, 1), (3, 1)])
def test_eval_output_matches_reference(implementation, shape):
    config = tiny_config()
    block = make_block(config, implementation).eval()
    reference = ReferenceMoE.from_block(block).eval()
    hidden = torch.randn(*shape, config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(hidden)
        actual = block(hidden)
    assert actual.shape == expected.shape == hidden.shape
    assert_close(actual, expected, f"{implementation} eval output")


def _train_step(module, hidden, grad_seed):
    hidden = hidden.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(hidden)
    (out * grad_seed).sum().backward()
    return out.detach(), hidden.grad


def _block_grads(block):
    shared = block.shared_experts
    return {
        "router": block.gate.weight.grad,
        "gate_up_proj": block.experts.gate_up_proj.grad,
        "down_proj": block.experts.down_proj.grad,
        "shared.gate_proj": shared.gate_proj.weight.grad,
        "shared.up_proj": shared.up_proj.weight.grad,
        "shared.down_proj": shared.down_proj.weight.grad,
    }


def _reference_grads(reference):
    gate_up, down = reference.stacked_expert_grads()
    shared = reference.shared_experts
    return {
        "router": reference.gate.weight.grad,
        "gate_up_proj": gate_up,
        "down_proj": down,
        "shared.gate_proj": shared.gate_proj.weight.grad,
        "shared.up_proj": shared.up_proj.weight.grad,
        "shared.down_proj": shared.down_proj.weight.grad,
    }


def _compare_training(config, implementation, hidden_shape, seed=0):
    block = make_block(config, implementation, seed=seed).train()
    reference = ReferenceMoE.from_block(block).train()
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(*hidden_shape, config.hidden_size, generator=gen)
    grad_seed = torch.randn(*hidden_shape, config.hidden_size, generator=gen)
    ref_out, ref_dx = _train_step(reference, hidden, grad_seed)
    out, dx = _train_step(block, hidden, grad_seed)
    assert_close(out, ref_out, f"{implementation} training output")
    assert_close(dx, ref_dx, f"{implementation} input gradient")
    ref_grads, grads = _reference_grads(reference), _block_grads(block)
    for name, expected in ref_grads.items():
        assert grads[name] is not None, f"{implementation}: {name} got no gradient"
        assert_close(grads[name], expected, f"{implementation} grad of {name}")
    return block, reference, hidden, grad_seed


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("seq_aux", [True, False])
def test_training_outputs_and_gradients_match_reference(implementation, seq_aux):
    config = tiny_config(seq_aux=seq_aux)
    _compare_training(config, implementation, (3, 6))


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_gradient_reaches_router(seq_aux):
    """The balance loss must change the router gradient, by the same amount in both implementations."""
    with_aux = tiny_config(seq_aux=seq_aux, aux_loss_alpha=0.1)
    without_aux = tiny_config(seq_aux=seq_aux, aux_loss_alpha=0.0)
    block_a, ref_a, hidden, grad_seed = _compare_training(with_aux, "sorted_loop", (3, 6))
    block_b = make_block(without_aux, "sorted_loop").train()
    ref_b = ReferenceMoE.from_block(block_b).train()
    assert torch.equal(block_b.gate.weight, block_a.gate.weight)
    out_b, _ = _train_step(block_b, hidden, grad_seed)
    _train_step(ref_b, hidden, grad_seed)
    # The aux loss only touches the gradient (the forward output is unchanged) ...
    assert torch.equal(out_b, block_a(hidden).detach())
    # ... and its contribution to the router gradient is substantial and identical in both.
    ours = block_a.gate.weight.grad - block_b.gate.weight.grad
    theirs = ref_a.gate.weight.grad - ref_b.gate.weight.grad
    assert ours.abs().max() > 1e-3
    assert_close(ours, theirs, "aux-loss part of the router gradient")
    # The expert weights do not see the aux loss.
    assert_close(block_a.experts.gate_up_proj.grad, block_b.experts.gate_up_proj.grad, "expert grad vs alpha")


@pytest.mark.parametrize("implementation", ["sorted_loop", "grouped_mm", "auto"])
def test_gradients_with_experts_that_receive_no_token(implementation):
    """16 experts, 2 tokens, top-2: at most 4 experts are hit; the others must get exactly zero gradient
    (sorted_loop fills its gradient buffers without zeroing, except for un-hit experts)."""
    config = tiny_config(n_routed_experts=16, num_experts_per_tok=2)
    block, reference, hidden, grad_seed = _compare_training(config, implementation, (1, 2), seed=3)
    eager = make_block(tiny_config(n_routed_experts=16, num_experts_per_tok=2), "eager", seed=3).train()
    _, eager_dx = _train_step(eager, hidden, grad_seed)
    _, dx = _train_step(block, hidden, grad_seed)
    assert_close(dx, eager_dx, "input gradient vs eager")
    for name, expected in _block_grads(eager).items():
        assert_close(_block_grads(block)[name], expected, f"{name} vs eager")
    with torch.no_grad():
        _, _, _, top_k_index = block.gate(hidden.reshape(-1, config.hidden_size))
    unhit = torch.ones(16, dtype=torch.bool)
    unhit[top_k_index.unique()] = False
    assert unhit.sum() >= 12
    assert torch.count_nonzero(block.experts.gate_up_proj.grad[unhit]) == 0
    assert torch.count_nonzero(block.experts.down_proj.grad[unhit]) == 0
    assert torch.count_nonzero(block.experts.gate_up_proj.grad[~unhit]) > 0


def test_sorted_loop_repeated_backward_accumulates_like_eager():
    """Two backward passes accumulate into .grad; buffers created with empty_like must not leak garbage."""
    config = tiny_config(n_routed_experts=16, num_experts_per_tok=2)
    grads = {}
    for implementation in ("eager", "sorted_loop"):
        block = make_block(tiny_config(n_routed_experts=16, num_experts_per_tok=2), implementation, seed=5).train()
        gen = torch.Generator().manual_seed(9)
        for shape in [(1, 2), (2, 3)]:
            hidden = torch.randn(*shape, config.hidden_size, generator=gen)
            block(hidden).square().sum().backward()
        grads[implementation] = _block_grads(block)
    for name, expected in grads["eager"].items():
        assert_close(grads["sorted_loop"][name], expected, f"accumulated {name}")


def test_bf16_routing_matches_reference_gate():
    """In bf16 (eval) our router must pick the same expert sets with bitwise-equal weights as the reference's
    bf16 logits + softmax; an fp32 upcast would flip near-ties on some of these tokens."""
    config = tiny_config(hidden_size=256, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=8)
    block = make_block(config, "sorted_loop", dtype=torch.bfloat16).eval()
    reference = ReferenceMoE.from_block(block).eval()
    assert reference.gate.weight.dtype == torch.bfloat16
    hidden = torch.randn(4, 512, config.hidden_size, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        ref_idx, ref_weight, ref_aux = reference.gate(hidden)
        _, _, weight, idx = block.gate(hidden.reshape(-1, config.hidden_size))
    assert ref_aux is None
    assert weight.dtype == ref_weight.dtype == torch.bfloat16
    ref_idx_sorted, ref_order = ref_idx.sort(dim=-1)
    idx_sorted, order = idx.sort(dim=-1)
    assert torch.equal(idx_sorted, ref_idx_sorted)
    assert torch.equal(weight.gather(-1, order), ref_weight.gather(-1, ref_order))
    # And the routing is genuinely different from an fp32-upcast router on some token (the test has teeth).
    with torch.no_grad():
        fp32_scores = torch.nn.functional.linear(hidden.float(), block.gate.weight.float()).softmax(-1)
    fp32_idx = fp32_scores.topk(6, dim=-1).indices.reshape(-1, 6).sort(dim=-1).values
    assert not torch.equal(fp32_idx, idx_sorted)


def test_bf16_eval_block_close_to_reference():
    """bf16 end to end: same routing, outputs equal up to bf16 accumulation-order rounding."""
    config = tiny_config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4)
    block = make_block(config, "sorted_loop", dtype=torch.bfloat16).eval()
    reference = ReferenceMoE.from_block(block).eval()
    hidden = torch.randn(2, 16, config.hidden_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        expected, actual = reference(hidden), block(hidden)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("training", [False, True])
def test_sorted_loop_handles_zero_tokens(training):
    block = make_block(tiny_config(), "sorted_loop").train(training)
    hidden = torch.randn(1, 0, 32, requires_grad=True)
    out = block(hidden)
    assert out.shape == hidden.shape
    if training:
        out.sum().backward()


def test_sorted_loop_non_silu_activation_gradients_match_eager():
    """The closed-form SwiGLU backward only covers SiLU; another activation takes the autograd fallback."""
    config = tiny_config(hidden_act="gelu", aux_loss_alpha=0.0)
    gen = torch.Generator().manual_seed(3)
    hidden, grad_seed = torch.randn(2, 5, config.hidden_size, generator=gen), torch.randn(2, 5, 32, generator=gen)
    results = {}
    for implementation in ("eager", "sorted_loop"):
        block = make_block(tiny_config(hidden_act="gelu", aux_loss_alpha=0.0), implementation).train()
        out, dx = _train_step(block, hidden, grad_seed)
        results[implementation] = (out, dx, _block_grads(block))
    out, dx, grads = results["sorted_loop"]
    assert_close(out, results["eager"][0], "gelu output")
    assert_close(dx, results["eager"][1], "gelu input gradient")
    for name, expected in results["eager"][2].items():
        assert_close(grads[name], expected, f"gelu grad of {name}")


@pytest.mark.parametrize("emulated", [False, True])
def test_sorted_loop_bf16_training_matches_fp32(monkeypatch, emulated):
    """bf16 training through both CPU matmul paths: native bf16 GEMMs, and (where the CPU only emulates them) fp32
    GEMMs on upcast operands for experts with enough rows. Both must track the fp32 computation to bf16 precision."""
    from modeling_deepseekmoe import experts_kernels as kernels

    monkeypatch.setattr(kernels, "_emulates_low_precision_matmul", lambda dtype: emulated and dtype == torch.bfloat16)
    config = tiny_config(n_routed_experts=16, num_experts_per_tok=4, aux_loss_alpha=0.0)
    gen = torch.Generator().manual_seed(7)
    hidden, grad_seed = torch.randn(2, 20, config.hidden_size, generator=gen), torch.randn(2, 20, 32, generator=gen)
    fp32 = make_block(config, "eager", seed=2).train()
    bf16_config = tiny_config(n_routed_experts=16, num_experts_per_tok=4, aux_loss_alpha=0.0)
    bf16 = make_block(bf16_config, "sorted_loop", seed=2).to(torch.bfloat16).train()
    with torch.no_grad():
        rows = torch.bincount(bf16.gate(hidden.reshape(-1, 32).bfloat16())[3].reshape(-1), minlength=16)
    # Some experts above the upcast threshold and some below, so both branches run.
    assert (rows >= kernels._UPCAST_MIN_ROWS).any() and ((rows > 0) & (rows < kernels._UPCAST_MIN_ROWS)).any()
    out32, dx32 = _train_step(fp32, hidden, grad_seed)
    out16, dx16 = _train_step(bf16, hidden.bfloat16(), grad_seed.bfloat16())
    assert out16.dtype == dx16.dtype == torch.bfloat16

    def check(actual, expected, what):
        scale = expected.abs().max()
        torch.testing.assert_close(actual.float() / scale, expected / scale, atol=3e-2, rtol=0, msg=what)

    check(out16, out32, "output")
    check(dx16, dx32, "input gradient")
    for name, expected in _block_grads(fp32).items():
        check(_block_grads(bf16)[name], expected, f"grad of {name}")


def test_sorted_loop_reuses_expert_gradient_memory_only_when_nothing_holds_it():
    """The fused expert weight gradients reuse the previous step's memory after `zero_grad(set_to_none=True)`; a
    gradient someone still holds is never overwritten, and eval mode lets the memory go."""
    config = tiny_config(n_routed_experts=16, num_experts_per_tok=2)
    block = make_block(config, "sorted_loop", seed=5).train()
    eager = make_block(tiny_config(n_routed_experts=16, num_experts_per_tok=2), "eager", seed=5).train()
    gen = torch.Generator().manual_seed(9)
    first, second = (torch.randn(2, 3, config.hidden_size, generator=gen) for _ in range(2))
    weight = block.experts.gate_up_proj

    block(first).square().sum().backward()
    assert _RECYCLED_GRADIENT_MEMORY.holds(weight)
    kept = weight.grad  # held by the caller across the next step
    kept_values = kept.clone()
    block.zero_grad(set_to_none=True)
    block(second).square().sum().backward()
    assert weight.grad.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, kept_values)
    del kept

    block.zero_grad(set_to_none=True)
    block(second).square().sum().backward()
    address = weight.grad.data_ptr()
    block.zero_grad(set_to_none=True)
    block(first).square().sum().backward()
    assert weight.grad.data_ptr() == address  # nothing held it: reused
    eager(first).square().sum().backward()
    for name, expected in _block_grads(eager).items():
        assert_close(_block_grads(block)[name], expected, f"{name} in reused memory")

    assert _RECYCLED_GRADIENT_MEMORY.holds(weight)
    block.eval()
    with torch.no_grad():
        block(first)
    assert not _RECYCLED_GRADIENT_MEMORY.holds(weight)  # eval mode lets the memory go
