"""The sorted-experts skeleton shared by the fine-tuning wrappers of the fused experts (expert LoRA, ESFT): sort the
(token, slot) pairs by expert, project gate/up, activate, project down, weight and unsort. Each wrapper supplies only
how a projection is computed for the rows of each expert."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.integrations.moe import _grouped_mm

from modeling_deepseekmoe.experts_kernels import hit_expert_bounds


# project(which, rows, counts) -> projected rows; `which` is "gate_up" or "down", rows are sorted by expert and
# `counts` [E] says how many rows each expert has.
Projection = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def sorted_experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    act_fn: Callable,
    project: Projection,
) -> torch.Tensor:
    num_tokens, top_k = top_k_index.shape
    flat_experts = top_k_index.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts)
    rows = hidden_states[order // top_k]
    gate, up = project("gate_up", rows, counts).chunk(2, dim=-1)
    out = project("down", act_fn(gate) * up, counts)
    weighted = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
    unsorted = torch.empty_like(weighted)
    unsorted[order] = weighted
    return unsorted.view(num_tokens, top_k, hidden_states.shape[-1]).sum(dim=1).to(hidden_states.dtype)


def looped_projection(
    rows: torch.Tensor,
    counts: torch.Tensor,
    expert_output: Callable[[int, torch.Tensor], torch.Tensor],
    out_features: int,
) -> torch.Tensor:
    """CPU path: `expert_output(expert, its rows)` for every hit expert, concatenated in row order (host-side counts
    are fine on CPU)."""
    pieces = [expert_output(expert, rows[start:end]) for expert, start, end in hit_expert_bounds(counts.tolist())]
    return torch.cat(pieces) if pieces else rows.new_zeros(0, out_features)


def grouped_projection(rows: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """GPU path: rows @ weights[e].T for each expert's rows, one grouped GEMM, no host synchronisation.
    `weights` is [E, out, in]."""
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return _grouped_mm(rows.to(weights.dtype), weights.transpose(-2, -1), offsets)


def linear(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(rows, weight.to(rows.dtype))
