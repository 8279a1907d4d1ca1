"""Changing the routers' decisions for ablations, with forward hooks on the stock model. Reading them is the routing
record's job (`modeling_deepseekmoe.routing.record_routing`, re-exported here with `moe_blocks` and `RouterOutput`).

Everything here is a context manager that removes its hooks (or restores the swapped module) on exit, also when the
body raises. The model code is not modified: the routers (`DeepseekMoEGate`) return
`(router_logits, scores, top_k_weights, top_k_index)` and the MoE block feeds the last two to its experts, so a
forward hook on the gate that replaces that tuple changes which experts run. A routing record attached after an
override sees the changed routing.
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from modeling_deepseekmoe.routing import RouterOutput, moe_blocks, record_routing

from .options import check_moe_layer


__all__ = ["RouterOutput", "disable_experts", "moe_blocks", "record_routing", "reroute", "routing_override",
           "without_shared_experts"]  # fmt: skip


def _per_token_top_mask(scores: torch.Tensor, r: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(r, dim=-1).indices, True)


def _per_token_random_mask(excluded: torch.Tensor, r: int, generator: torch.Generator) -> torch.Tensor:
    """`r` experts per token drawn uniformly among those not `excluded` ([N, E] bool)."""
    noise = torch.rand(excluded.shape, generator=generator).masked_fill_(excluded.cpu(), 2.0)
    mask = torch.zeros(excluded.shape, dtype=torch.bool)
    mask.scatter_(1, noise.argsort(dim=-1)[:, :r], True)
    return mask.to(excluded.device)


def reroute(output: RouterOutput, disabled: torch.Tensor, top_k: int, norm_topk_prob: bool) -> RouterOutput:
    """Routing with the `disabled` experts ([N, E] or [E] bool) masked out after the softmax: each token takes the
    top-k of its remaining probabilities, not renormalised (unless the model itself renormalises its top-k).

    Tokens whose original choice avoids every disabled expert (with the same k) keep their routing bit for bit, so
    disabling an expert no token selects leaves the outputs exactly unchanged."""
    scores = output.scores
    disabled = disabled.to(scores.device).expand_as(scores)
    weights, index = scores.masked_fill(disabled, float("-inf")).topk(top_k, dim=-1, sorted=False)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if top_k == output.top_k_index.shape[-1]:
        affected = disabled.gather(1, output.top_k_index).any(dim=-1, keepdim=True)
        weights = torch.where(affected, weights, output.top_k_weights)
        index = torch.where(affected, index, output.top_k_index)
    return RouterOutput(output.router_logits, scores, weights, index)


def _check_enough_experts(num_experts: int, num_disabled: int, top_k: int, what: str) -> None:
    if num_experts - num_disabled < top_k:
        raise ValueError(
            f"Disabling {num_disabled} of {num_experts} routed experts ({what}) leaves fewer than the {top_k} each "
            "token needs; disable fewer experts (a smaller ratio)."
        )


@contextmanager
def routing_override(
    model: nn.Module,
    disabled: Mapping[int, Sequence[int]] | None = None,
    per_token_top_r: int = 0,
    per_token_random_r: int = 0,
    top_k: int | None = None,
    seed: int = 0,
) -> Iterator[None]:
    """Change the routing of every MoE layer while the context is active.

    Args:
        disabled: layer -> routed experts that no token may use in that layer (e.g. the most loaded ones).
        per_token_top_r: for every token, disable its `r` highest-probability experts (paper Section 4.5).
        per_token_random_r: for every token, disable `r` experts drawn at random (the baseline for the above).
        top_k: number of routed experts per token (default: the model's `num_experts_per_tok`).
        seed: seed of the random draws.

    Disabled experts are masked after the softmax and every token takes the top-k of the rest, without
    renormalising (see `reroute`). The router logits and probabilities that the hooks report are left as they are.
    """
    blocks = moe_blocks(model)
    disabled = {layer: list(experts) for layer, experts in (disabled or {}).items()}
    for layer in disabled:
        check_moe_layer(layer, list(blocks))
    generator = torch.Generator().manual_seed(seed)

    def make_hook(layer: int, gate: nn.Module):
        num_experts, k = gate.weight.shape[0], top_k or gate.top_k
        experts = disabled.get(layer, [])
        if any(not 0 <= expert < num_experts for expert in experts):
            raise ValueError(f"Layer {layer}: expert ids {experts} must lie in 0..{num_experts - 1}.")
        fixed = torch.zeros(num_experts, dtype=torch.bool)
        fixed[experts] = True
        num_disabled = int(fixed.sum()) + per_token_top_r + per_token_random_r
        _check_enough_experts(num_experts, num_disabled, k, f"layer {layer}")

        def hook(module, args, output):
            output = RouterOutput(*output)
            mask = fixed.to(output.scores.device).expand_as(output.scores).clone()
            if per_token_top_r:
                mask |= _per_token_top_mask(output.scores.masked_fill(mask, float("-inf")), per_token_top_r)
            if per_token_random_r:
                mask |= _per_token_random_mask(mask, per_token_random_r, generator)
            return tuple(reroute(output, mask, k, gate.norm_topk_prob))

        return hook

    hooks = {layer: make_hook(layer, block.gate) for layer, block in blocks.items()}  # validates before registering
    handles = [blocks[layer].gate.register_forward_hook(hook) for layer, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def disable_experts(model: nn.Module, experts: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Disable the given routed experts (layer -> expert ids) while the context is active."""
    with routing_override(model, disabled=experts):
        yield


@contextmanager
def without_shared_experts(model: nn.Module) -> Iterator[None]:
    """Run the MoE layers without their shared experts (restored on exit): the block then adds nothing for them,
    exactly as a model configured with `n_shared_experts=0`."""
    blocks = moe_blocks(model)
    saved = {layer: block.shared_experts for layer, block in blocks.items()}
    if all(shared is None for shared in saved.values()):
        raise ValueError("The model has no shared experts; the 'without shared experts' ablation does not apply.")
    try:
        for block in blocks.values():
            block.shared_experts = None
        yield
    finally:
        for layer, block in blocks.items():
            block.shared_experts = saved[layer]
