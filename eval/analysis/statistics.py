"""Routing statistics per MoE layer and routed expert, accumulated batch by batch from the routers' decisions.

For layer l and expert e over the real (non-padding) tokens t:

- load share: `#{(t, k): top_k_index[t, k] = e} / (T * K)`, the fraction of routing slots the expert gets (sums to 1
  per layer; uniform is 1/E). This is ESFT's token selection ratio, averaged over tokens instead of per sequence;
- mean routing weight: mean of the expert's top-k weight over the tokens that selected it;
- gate score: sum of the expert's top-k weights / T (ESFT's average gate score, averaged over tokens);
- mean probability: mean softmax probability over all tokens, selected or not;
- balance of each layer over its experts: coefficient of variation of the load (std / mean, 0 is perfectly balanced),
  normalised entropy (1 is balanced), max / mean, and the number of experts no token selected;
- per domain: the same load shares over the domain's tokens; the specialisation score of a domain in a layer is the
  total variation distance between its load distribution and that of all other tokens (0: routed like the rest,
  1: disjoint experts); the lift of an expert for a domain is its load share in the domain / its overall share;
- top tokens per expert, with a bounded-memory heavy-hitter summary (`TopTokenCounter`).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from modeling_deepseekmoe.routing import RouterOutput, expert_counts, expert_weight_sums, moe_blocks, record_routing

from .data import EncodedSample
from .passes import BatchContext, LossResult, input_device, run_data_pass


class TopTokenCounter:
    """Frequent tokens of every expert of one layer in bounded memory: a Misra-Gries summary of at most `capacity`
    counters per expert, merged batch by batch (the mergeable-summaries rule: add the counts, subtract the
    (capacity + 1)-th largest of each expert, drop counters that reach 0).

    A reported count underestimates the true count by at most `max_undercount(expert)`; while an expert has seen no
    more than `capacity` distinct tokens nothing is subtracted and its counts are exact. Every token with a share
    above 1 / (capacity + 1) of an expert's selections is guaranteed to be kept.
    """

    def __init__(self, num_experts: int, vocab_size: int, capacity: int = 256):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}.")
        self.num_experts, self.vocab_size, self.capacity = num_experts, vocab_size, capacity
        self.keys = torch.zeros(0, dtype=torch.long)  # expert * vocab_size + token
        self.counts = torch.zeros(0, dtype=torch.long)
        self.subtracted = torch.zeros(num_experts, dtype=torch.long)

    def update(self, expert_ids: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count one selection per element: `expert_ids` [N, K] (or [M]) and the token of each row, `token_ids` [N]."""
        if expert_ids.dim() == 2:
            token_ids = token_ids[:, None].expand_as(expert_ids)
        keys = (expert_ids.reshape(-1).long() * self.vocab_size + token_ids.reshape(-1).long()).cpu()
        batch_keys, batch_counts = torch.unique(keys, return_counts=True)
        keys, inverse = torch.unique(torch.cat([self.keys, batch_keys]), return_inverse=True)
        counts = torch.zeros(keys.shape[0], dtype=torch.long)
        counts.index_add_(0, inverse, torch.cat([self.counts, batch_counts]))
        self._shrink(keys, counts)

    def _shrink(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        experts = keys // self.vocab_size
        by_count = torch.argsort(counts, descending=True, stable=True)
        order = by_count[torch.argsort(experts[by_count], stable=True)]  # by expert, then count descending
        keys, counts, experts = keys[order], counts[order], experts[order]
        group_sizes = torch.bincount(experts, minlength=self.num_experts)
        group_starts = torch.cumsum(group_sizes, 0) - group_sizes
        rank = torch.arange(keys.shape[0]) - group_starts[experts]
        threshold = torch.zeros(self.num_experts, dtype=torch.long)
        overflow = rank == self.capacity
        threshold[experts[overflow]] = counts[overflow]
        counts = counts - threshold[experts]
        keep = (rank < self.capacity) & (counts > 0)
        self.keys, self.counts = keys[keep], counts[keep]
        self.subtracted += threshold

    def top(self, expert: int, n: int = 10) -> list[tuple[int, int]]:
        """The (token id, count) pairs of `expert`, most frequent first."""
        in_expert = (self.keys // self.vocab_size) == expert
        keys, counts = self.keys[in_expert], self.counts[in_expert]
        order = torch.argsort(counts, descending=True, stable=True)[:n]
        return [(int(key) % self.vocab_size, int(count)) for key, count in zip(keys[order], counts[order])]

    def max_undercount(self, expert: int) -> int:
        return int(self.subtracted[expert])


def _expert_sums(index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selections and summed top-k weights per expert, as float64 on the CPU."""
    counts, weight_sums = expert_counts(index, num_experts), expert_weight_sums(index, weights, num_experts)
    return counts.cpu().double(), weight_sums.cpu().double()


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), torch.zeros_like(numerator))


class RoutingStatistics:
    """Streaming routing statistics of the MoE layers `layers` (a collector for `run_data_pass`). Sums are float64;
    only `[layers, experts]` tables and the bounded top-token summaries are kept."""

    def __init__(self, layers: Sequence[int], num_experts: int, vocab_size: int, top_token_capacity: int = 256):
        self.layers = list(layers)
        self.num_experts = num_experts
        self._row = {layer: row for row, layer in enumerate(self.layers)}
        shape = (len(self.layers), num_experts)
        self.tokens = torch.zeros(len(self.layers), dtype=torch.float64)
        self.counts = torch.zeros(shape, dtype=torch.float64)
        self.weight_sums = torch.zeros(shape, dtype=torch.float64)
        self.score_sums = torch.zeros(shape, dtype=torch.float64)
        self.domain_tokens: dict[str, torch.Tensor] = {}
        self.domain_counts: dict[str, torch.Tensor] = {}
        self.domain_weight_sums: dict[str, torch.Tensor] = {}
        self.top_tokens = [TopTokenCounter(num_experts, vocab_size, top_token_capacity) for _ in self.layers]

    @classmethod
    def for_model(
        cls, model: nn.Module, layers: Sequence[int] | None = None, top_token_capacity: int = 256
    ) -> "RoutingStatistics":
        blocks = moe_blocks(model)
        layers = list(blocks) if layers is None else list(layers)
        return cls(layers, blocks[layers[0]].config.n_routed_experts, model.config.vocab_size, top_token_capacity)

    # ---- accumulation ----------------------------------------------------------------------------------------------

    def on_gate(
        self, layer: int, block: nn.Module, hidden_states: torch.Tensor, output: RouterOutput, batch: BatchContext
    ) -> None:
        row = self._row[layer]
        mask = batch.token_mask
        index, weights = output.top_k_index[mask], output.top_k_weights[mask]
        counts, weight_sums = _expert_sums(index, weights, self.num_experts)
        self.tokens[row] += index.shape[0]
        self.counts[row] += counts
        self.weight_sums[row] += weight_sums
        self.score_sums[row] += output.scores[mask].float().sum(dim=0).cpu().double()
        for domain, domain_mask in batch.domain_masks.items():
            self._add_domain(domain, row, output, domain_mask)
        self.top_tokens[row].update(index, batch.token_ids[mask])

    def _add_domain(self, domain: str, row: int, output: RouterOutput, mask: torch.Tensor) -> None:
        if domain not in self.domain_counts:
            self.domain_tokens[domain] = torch.zeros_like(self.tokens)
            self.domain_counts[domain] = torch.zeros_like(self.counts)
            self.domain_weight_sums[domain] = torch.zeros_like(self.weight_sums)
        counts, weight_sums = _expert_sums(output.top_k_index[mask], output.top_k_weights[mask], self.num_experts)
        self.domain_tokens[domain][row] += int(mask.sum())
        self.domain_counts[domain][row] += counts
        self.domain_weight_sums[domain][row] += weight_sums

    # ---- derived statistics ----------------------------------------------------------------------------------------

    def row(self, layer: int) -> int:
        """Row of `layer` in the `[layers, experts]` tables."""
        if layer not in self._row:
            raise ValueError(f"Layer {layer} was not analysed; the analysed MoE layers are {self.layers}.")
        return self._row[layer]

    @property
    def domains(self) -> list[str]:
        return list(self.domain_counts)

    @property
    def load_share(self) -> torch.Tensor:
        """[layers, experts]: fraction of the routing slots each expert received."""
        return _safe_divide(self.counts, self.counts.sum(dim=-1, keepdim=True))

    @property
    def mean_weight(self) -> torch.Tensor:
        """[layers, experts]: mean top-k weight when selected (0 for experts never selected)."""
        return _safe_divide(self.weight_sums, self.counts)

    @property
    def gate_score(self) -> torch.Tensor:
        return _safe_divide(self.weight_sums, self.tokens[:, None])

    @property
    def mean_probability(self) -> torch.Tensor:
        return _safe_divide(self.score_sums, self.tokens[:, None])

    def balance(self) -> dict[str, torch.Tensor]:
        """Per layer: coefficient of variation, normalised entropy, max/mean of the load, unused experts."""
        load = self.load_share
        mean = load.mean(dim=-1)
        entropy = -(load * load.clamp(min=1e-300).log()).sum(dim=-1)
        return {
            "cv": _safe_divide(load.std(dim=-1, unbiased=False), mean),
            "normalized_entropy": entropy / math.log(self.num_experts),
            "max_over_mean": _safe_divide(load.max(dim=-1).values, mean),
            "unused_experts": (self.counts == 0).sum(dim=-1).double(),
        }

    def domain_load_share(self, domain: str) -> torch.Tensor:
        if domain not in self.domain_counts:
            raise ValueError(f"Unknown domain {domain!r}; the data has the domains {self.domains}.")
        counts = self.domain_counts[domain]
        return _safe_divide(counts, counts.sum(dim=-1, keepdim=True))

    def domain_lift(self, domain: str) -> torch.Tensor:
        """[layers, experts]: load share within the domain / overall load share (1 = as often as overall)."""
        return _safe_divide(self.domain_load_share(domain), self.load_share)

    def specialisation(self) -> torch.Tensor:
        """[domains, layers]: total variation distance between each domain's load distribution and the load
        distribution of all other tokens. Empty with fewer than two domains."""
        rows = []
        for domain in self.domains:
            rest = self.counts - self.domain_counts[domain]
            rest_share = _safe_divide(rest, rest.sum(dim=-1, keepdim=True))
            rows.append(0.5 * (self.domain_load_share(domain) - rest_share).abs().sum(dim=-1))
        if len(rows) < 2:
            return torch.zeros(0, len(self.layers), dtype=torch.float64)
        return torch.stack(rows)

    def top_experts(self, layer: int, domain: str | None = None, n: int | None = None) -> list[int]:
        """Experts of `layer` by decreasing load share (within `domain` if given), experts never selected left out."""
        load = (self.load_share if domain is None else self.domain_load_share(domain))[self.row(layer)]
        order = torch.argsort(load, descending=True, stable=True)
        return [int(expert) for expert in order if load[expert] > 0][:n]

    def most_loaded_experts(self, count: int) -> dict[int, list[int]]:
        """layer -> its `count` most loaded experts (ties broken by expert id)."""
        return {
            layer: torch.argsort(self.load_share[row], descending=True, stable=True)[:count].tolist()
            for layer, row in self._row.items()
        }

    def to_dict(self, tokenizer=None, top_n_tokens: int = 10) -> dict:
        """JSON-ready tables: lists indexed [layer row][expert] with `layers` giving the layer of each row."""
        balance = self.balance()
        result = {
            "layers": self.layers,
            "num_experts": self.num_experts,
            "tokens": self.tokens.tolist(),
            "selections": self.counts.tolist(),
            "load_share": self.load_share.tolist(),
            "mean_weight": self.mean_weight.tolist(),
            "gate_score": self.gate_score.tolist(),
            "mean_probability": self.mean_probability.tolist(),
            "balance": {name: values.tolist() for name, values in balance.items()},
            "domains": {
                domain: {
                    "tokens": self.domain_tokens[domain].tolist(),
                    "load_share": self.domain_load_share(domain).tolist(),
                    "mean_weight": _safe_divide(self.domain_weight_sums[domain], self.domain_counts[domain]).tolist(),
                    "lift": self.domain_lift(domain).tolist(),
                    "top_experts": {str(layer): self.top_experts(layer, domain, n=8) for layer in self.layers},
                }
                for domain in self.domains
            },
            "specialisation": dict(zip(self.domains, self.specialisation().tolist())),
            "top_tokens": self._top_tokens_dict(tokenizer, top_n_tokens),
        }
        return result

    def _top_tokens_dict(self, tokenizer, n: int) -> dict:
        def describe(token_id: int) -> str | int:
            return tokenizer.decode([token_id]) if tokenizer is not None else token_id

        return {
            str(layer): [
                {
                    "expert": expert,
                    "tokens": [[describe(token), count] for token, count in counter.top(expert, n)],
                    "max_undercount": counter.max_undercount(expert),
                }
                for expert in range(self.num_experts)
            ]
            for layer, counter in zip(self.layers, self.top_tokens)
        }


def collect_routing_statistics(
    model: nn.Module,
    samples: Sequence[EncodedSample],
    batch_size: int = 4,
    pad_token_id: int = 0,
    layers: Sequence[int] | None = None,
    top_token_capacity: int = 256,
    progress: bool = True,
) -> tuple[RoutingStatistics, LossResult]:
    """Routing statistics of the model on `samples`, and its loss on them, from one streaming pass."""
    statistics = RoutingStatistics.for_model(model, layers, top_token_capacity)
    loss = run_data_pass(model, samples, batch_size, pad_token_id, [statistics], progress=progress, desc="routing")
    return statistics, loss


@dataclass
class TokenRouting:
    """Routing of every token of one text: per MoE layer, the experts (by decreasing weight) and all probabilities."""

    tokens: list[str]
    input_ids: list[int]
    experts: dict[int, torch.Tensor]  # layer -> [T, K] expert ids, highest weight first
    weights: dict[int, torch.Tensor]  # layer -> [T, K]
    scores: dict[int, torch.Tensor]  # layer -> [T, E] softmax probabilities

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "input_ids": self.input_ids,
            "experts": {str(layer): ids.tolist() for layer, ids in self.experts.items()},
            "weights": {str(layer): weights.tolist() for layer, weights in self.weights.items()},
        }


@torch.no_grad()
def token_routing(model: nn.Module, tokenizer, text: str, max_length: int | None = None) -> TokenRouting:
    """Which routed experts each token of `text` uses in every MoE layer, with their weights and the probabilities."""
    ids = tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"]
    if not ids:
        raise ValueError("The text for the per-token routing is empty after tokenisation; pass a non-empty --text.")
    was_training = model.training
    model.eval()
    try:
        with record_routing(model) as routing:
            model(input_ids=torch.tensor([ids], device=input_device(model)), use_cache=False)
    finally:
        model.train(was_training)
    captured = {layer: RouterOutput(*(tensor.float().cpu() for tensor in output))
                for layer, output in routing.outputs.items()}  # fmt: skip
    experts, weights = {}, {}
    for layer, output in captured.items():
        order = output.top_k_weights.argsort(dim=-1, descending=True, stable=True)
        experts[layer] = output.top_k_index.long().gather(1, order)
        weights[layer] = output.top_k_weights.gather(1, order)
    tokens = [tokenizer.decode([token_id]) for token_id in ids]
    return TokenRouting(tokens, list(ids), experts, weights, {layer: out.scores for layer, out in captured.items()})
