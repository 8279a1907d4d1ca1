"""A re-implementation of the released DeepSeekMoE MoE block (remote `modeling_deepseek.py`, classes `MoEGate`,
`DeepseekMoE` and `AddAuxiliaryLoss`), written from the algorithm description in the project's reference notes
(model.md sections 3.4-3.6). It is the yardstick for parity tests and benchmarks of the native
`DeepseekMoESparseMoeBlock`; it is not used by the model itself.

What it reproduces, on purpose, including the slow parts:
- router logits and softmax in the activation dtype (no fp32 upcast), `topk(sorted=False)`, optional renormalisation;
- one `nn.Module` (SwiGLU MLP with gate/up/down `nn.Linear`) per routed expert, in an `nn.ModuleList`;
- training branch (`self.training`): every token repeated K times, ALL experts run on their boolean-masked rows,
  weighted, summed over K, then the balance loss injected through an identity autograd function;
- inference branch (`moe_infer`, no grad): argsort of the flattened expert ids, `bincount().cpu()` host sync, a
  per-expert loop and `scatter_reduce_(sum)`;
- the shared experts (one MLP of width `n_shared_experts * moe_intermediate_size`) added unweighted.

One deliberate difference: the released code crashes in training with `aux_loss_alpha == 0`
(`AddAuxiliaryLoss.apply(y, None)`); here the injection is simply skipped when there is no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


__all__ = ["ReferenceAddAuxiliaryLoss", "ReferenceMLP", "ReferenceMoEGate", "ReferenceMoE"]


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


class ReferenceMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), no biases. One routed expert, or the fused shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        if hidden_act != "silu":
            raise NotImplementedError(f"ReferenceMLP only implements silu, got {hidden_act!r}")
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_silu(self.gate_proj(x)) * self.up_proj(x))


class ReferenceMoEGate(nn.Module):
    """Softmax top-k router with the sequence-level (or batch-level) balance loss, model.md 3.4 and 3.6."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.scoring_func = config.scoring_func
        self.weight = nn.Parameter(torch.empty(self.n_routed_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, hidden_states: torch.Tensor):
        """hidden_states [B, T, H] -> (topk_idx [B*T, K], topk_weight [B*T, K], aux_loss scalar or None)."""
        bsz, seq_len, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        # Logits and scores in the activation dtype: the weight lives in the model dtype, nothing is upcast.
        logits = F.linear(flat, self.weight)
        if self.scoring_func != "softmax":
            raise NotImplementedError(f"unsupported scoring function {self.scoring_func!r}")
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)

        aux_loss = None
        if self.training and self.alpha > 0.0:
            num_experts, top_k = self.n_routed_experts, self.top_k
            idx_per_seq = topk_idx.view(bsz, seq_len * top_k)
            if self.seq_aux:
                # f_{b,i} = E / (K T) * #{(t, k): idx = i};  P_{b,i} = mean_t s_{b,t,i};  L = alpha mean_b sum_i f P
                counts = torch.zeros(bsz, num_experts, device=hidden_states.device)
                counts.scatter_add_(1, idx_per_seq, torch.ones(bsz, seq_len * top_k, device=hidden_states.device))
                load = counts / (seq_len * top_k / num_experts)
                mean_scores = scores.view(bsz, seq_len, num_experts).mean(dim=1)
                aux_loss = (load * mean_scores).sum(dim=1).mean() * self.alpha
            else:
                # f_i = E * fraction of (token, slot) pairs routed to i;  P_i = mean_t s_{t,i};  L = alpha sum_i f P
                one_hot = F.one_hot(topk_idx.reshape(-1), num_classes=num_experts)
                load = one_hot.float().mean(dim=0) * num_experts
                mean_scores = scores.mean(dim=0)
                aux_loss = (load * mean_scores).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class ReferenceAddAuxiliaryLoss(torch.autograd.Function):
    """Returns `x` unchanged; its backward passes the gradient to `x` and a gradient of 1 to `loss`, which adds the
    balance loss to whatever loss is later differentiated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        assert loss.numel() == 1, "the auxiliary loss must be a scalar"
        ctx.loss_dtype = loss.dtype
        ctx.loss_needs_grad = loss.requires_grad
        return x

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_loss = None
        if ctx.loss_needs_grad:
            grad_loss = torch.ones(1, dtype=ctx.loss_dtype, device=grad_output.device)
        return grad_output, grad_loss


class ReferenceMoE(nn.Module):
    """The released DeepSeekMoE block: per-expert modules, training branch and `moe_infer`, chosen by `self.training`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts_per_tok = config.num_experts_per_tok
        self.experts = nn.ModuleList(
            ReferenceMLP(config.hidden_size, config.moe_intermediate_size, config.hidden_act)
            for _ in range(config.n_routed_experts)
        )
        self.gate = ReferenceMoEGate(config)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = ReferenceMLP(
                config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.hidden_act
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity = hidden_states
        orig_shape = hidden_states.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        flat_states = hidden_states.reshape(-1, orig_shape[-1])
        flat_topk_idx = topk_idx.reshape(-1)
        if self.training:
            # Row t*K + k of the repeated input belongs to slot k of token t, matching the flattened ids.
            repeated = flat_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(repeated)
            for expert_id, expert in enumerate(self.experts):
                mask = flat_topk_idx == expert_id
                y[mask] = expert(repeated[mask]).to(y.dtype)
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
            y = y.to(hidden_states.dtype).view(*orig_shape)
            if aux_loss is not None:
                y = ReferenceAddAuxiliaryLoss.apply(y, aux_loss)
        else:
            y = self.moe_infer(flat_states, flat_topk_idx, topk_weight.reshape(-1, 1)).view(*orig_shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y

    @torch.no_grad()
    def moe_infer(
        self, x: torch.Tensor, flat_expert_indices: torch.Tensor, flat_expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """x [N, H], flat ids [N*K], flat weights [N*K, 1] -> [N, H]."""
        expert_cache = torch.zeros_like(x)
        order = flat_expert_indices.argsort()
        ends = flat_expert_indices.bincount().cpu().numpy().cumsum(0)  # host sync, as in the reference
        token_ids = order // self.num_experts_per_tok
        start = 0
        for expert_id, end in enumerate(ends):
            end = int(end)
            if start == end:
                continue
            rows = token_ids[start:end]
            expert_out = self.experts[expert_id](x[rows])
            expert_out.mul_(flat_expert_weights[order[start:end]])
            expert_cache.scatter_reduce_(
                0, rows.view(-1, 1).repeat(1, x.shape[-1]), expert_out.to(expert_cache.dtype), reduce="sum"
            )
            start = end
        return expert_cache

    # -- weights from the native block -------------------------------------------------------------------------

    @torch.no_grad()
    def load_from_block(self, block: nn.Module) -> "ReferenceMoE":
        """Copy the weights of a `DeepseekMoESparseMoeBlock` (fused `gate_up_proj [E, 2I, H]` with the gate rows
        first, `down_proj [E, H, I]`) into the per-expert modules. Dtype and device follow the block."""
        intermediate = self.config.moe_intermediate_size
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        if gate_up.shape[0] != len(self.experts) or gate_up.shape[1] != 2 * intermediate:
            raise ValueError(f"block experts {tuple(gate_up.shape)} do not match this ReferenceMoE's config")
        self.to(device=gate_up.device, dtype=gate_up.dtype)
        for expert_id, expert in enumerate(self.experts):
            expert.gate_proj.weight.copy_(gate_up[expert_id, :intermediate])
            expert.up_proj.weight.copy_(gate_up[expert_id, intermediate:])
            expert.down_proj.weight.copy_(down[expert_id])
        self.gate.weight.data = block.gate.weight.detach().clone()
        if self.shared_experts is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                source = getattr(block.shared_experts, name).weight
                getattr(self.shared_experts, name).weight.data = source.detach().clone()
        self.train(block.training)
        return self

    @classmethod
    def from_block(cls, block: nn.Module) -> "ReferenceMoE":
        """A `ReferenceMoE` with the config and (copied) weights of a `DeepseekMoESparseMoeBlock`."""
        weight = block.experts.gate_up_proj
        with torch.device("meta"):
            reference = cls(block.config).to(dtype=weight.dtype)
        # Allocated uninitialised, directly in the block's dtype and device; every tensor is then overwritten.
        reference = reference.to_empty(device=weight.device)
        return reference.load_from_block(block)

    @torch.no_grad()
    def stacked_expert_grads(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-expert weight gradients stacked in the fused layout: (grad gate_up [E, 2I, H], grad down [E, H, I]).
        An expert whose parameters have no gradient contributes zeros."""

        def grad_or_zeros(param: torch.Tensor) -> torch.Tensor:
            return param.grad if param.grad is not None else torch.zeros_like(param)

        if all(p.grad is None for p in self.experts.parameters()):
            return None, None
        gate_up = torch.stack(
            [torch.cat([grad_or_zeros(e.gate_proj.weight), grad_or_zeros(e.up_proj.weight)]) for e in self.experts]
        )
        down = torch.stack([grad_or_zeros(e.down_proj.weight) for e in self.experts])
        return gate_up, down
