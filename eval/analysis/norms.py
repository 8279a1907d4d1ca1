"""Expert output norm vs router score on data ("A Closer Look into MoE", Lo et al. 2024, arXiv 2406.18219).

For a budget of real tokens per MoE layer, every routed expert is run on the token's MoE input (not only the top-k
it was routed to), and the L2 norm of each expert's output is compared with the router's softmax probability:

- `rank_counts[i, j]`: number of tokens for which the expert with the i-th highest score has the j-th highest
  output norm (rank 0 = highest); mass on the diagonal means the router prefers large-norm experts;
- `spearman`: mean over tokens of the rank correlation, across experts, between score and output norm;
- `top1_agreement`: fraction of tokens whose highest-scored expert also has the largest output norm;
- `topk_overlap`: mean fraction of the k highest-scored experts that are among the k largest-norm experts.

The experts are run through the stock experts module (one expert per call, weight 1), so any experts implementation,
quantized ones included, is measured as it computes.
"""

from collections.abc import Sequence

import torch
from torch import nn

from modeling_deepseekmoe.routing import RouterOutput

from .passes import BatchContext


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, 0 for the largest."""
    return values.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)


def _rowwise_pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=-1, keepdim=True)
    y = y - y.mean(dim=-1, keepdim=True)
    return (x * y).sum(dim=-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp(min=1e-12)


@torch.no_grad()
def expert_output_norms(experts: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """[N, E]: norm of every routed expert's output for every row of `hidden_states` [N, H]."""
    num_tokens, num_experts = hidden_states.shape[0], experts.num_experts
    ones = torch.ones(num_tokens, 1, dtype=hidden_states.dtype, device=hidden_states.device)
    norms = []
    for expert in range(num_experts):
        index = torch.full((num_tokens, 1), expert, dtype=torch.long, device=hidden_states.device)
        norms.append(experts(hidden_states, index, ones).float().norm(dim=-1).cpu())
    return torch.stack(norms, dim=-1)


class OutputNormCollector:
    """Collects (score, output norm) of every routed expert for the first `max_tokens` real tokens of each layer."""

    def __init__(self, layers: Sequence[int] | None, max_tokens: int = 256):
        self.layers = None if layers is None else list(layers)
        self.max_tokens = max_tokens
        self.scores: dict[int, list[torch.Tensor]] = {}
        self.norms: dict[int, list[torch.Tensor]] = {}
        self.top_k: dict[int, int] = {}

    def _seen(self, layer: int) -> int:
        return sum(chunk.shape[0] for chunk in self.scores.get(layer, []))

    def on_gate(
        self, layer: int, block: nn.Module, hidden_states: torch.Tensor, output: RouterOutput, batch: BatchContext
    ) -> None:
        budget = self.max_tokens - self._seen(layer)
        if budget <= 0:
            return
        rows = batch.token_mask.nonzero().squeeze(-1)[:budget]
        if rows.numel() == 0:
            return
        self.top_k[layer] = output.top_k_index.shape[-1]
        self.scores.setdefault(layer, []).append(output.scores[rows].float().cpu())
        self.norms.setdefault(layer, []).append(expert_output_norms(block.experts, hidden_states[rows]))

    def layer_data(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [n, E], norms [n, E]) collected for `layer`."""
        if layer not in self.scores:
            raise ValueError(f"No output norms were collected for layer {layer}; collected: {sorted(self.scores)}.")
        return torch.cat(self.scores[layer]), torch.cat(self.norms[layer])

    def summary(self, layer: int) -> dict:
        scores, norms = self.layer_data(layer)
        score_rank, norm_rank = _ranks(scores), _ranks(norms)
        num_experts, k = scores.shape[-1], self.top_k[layer]
        pairs = (score_rank * num_experts + norm_rank).reshape(-1)
        rank_counts = torch.bincount(pairs, minlength=num_experts * num_experts)
        top_score, top_norm = score_rank < k, norm_rank < k
        return {
            "tokens": scores.shape[0],
            "spearman": float(_rowwise_pearson(score_rank.float(), norm_rank.float()).mean()),
            "top1_agreement": float((score_rank.argmin(dim=-1) == norm_rank.argmin(dim=-1)).float().mean()),
            "topk_overlap": float((top_score & top_norm).sum(dim=-1).float().mean() / k),
            "mean_norm": norms.mean(dim=0).tolist(),
            "mean_score": scores.mean(dim=0).tolist(),
            "rank_counts": rank_counts.view(num_experts, num_experts).tolist(),
        }

    def to_dict(self) -> dict:
        return {str(layer): self.summary(layer) for layer in sorted(self.scores)}
