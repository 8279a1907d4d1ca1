"""Static analyses of the expert weights ("A Closer Look into MoE", Lo et al. 2024, arXiv 2406.18219).

Expert similarity (matrix level). Every expert's `gate_proj [I, H]`, `up_proj [I, H]` and `down_proj [H, I]` are
flattened and compared by cosine similarity, pairwise within a layer ("all" compares the three concatenated).

Shared experts. The shared MLP of a layer has width `n_shared * I` (I = `moe_intermediate_size`). A SwiGLU MLP is
a sum over its intermediate neurons, so it is exactly the sum of `n_shared` experts of width I: slice j takes
gate/up rows `[j*I, (j+1)*I)` and the same down_proj columns. Those slices (labelled S0, S1, ...) are compared with
the routed experts like any other expert. The split is one of many equivalent ones (any regrouping of the shared
neurons gives the same MLP), so a shared slice's similarity to a routed expert says whether their weights overlap
as stored, not that the slice is a unit the model learnt; experts trained from scratch (DeepSeekMoE) show cosines
near 0 at the matrix level for this reason too (neuron order is arbitrary).

Router vs expert weights. Following Lo et al., per layer: the pairwise cosine similarities of the router rows
(the "gate embeddings") are correlated (Pearson R over expert pairs i < j) with the pairwise cosine similarities of
the experts' neuron-averaged projections (`gate_proj` and `up_proj` averaged over their I rows, `down_proj` over
its I columns, each giving an H-vector). Lo et al. report R^2 ~ 0.40 for gate_proj on deepseek-moe-16b. We also
report the direct alignment: the cosine between router row e and expert e's neuron-averaged gate_proj, compared
with the mean over mismatched pairs (e != f).
"""

from collections.abc import Sequence

import torch
from torch import nn

from modeling_deepseekmoe.routing import moe_blocks

from .options import check_moe_layer


PROJECTIONS = ("gate", "up", "down")


class UnsupportedWeightsError(ValueError):
    """The weights cannot be read as dense values (offloaded to the meta device, or an unknown quantization)."""


def _dequantizer():
    """`modeling_deepseekmoe.quantization.dequantize_weight` (bitsandbytes 4-bit / 8-bit weights), if available."""
    try:
        from modeling_deepseekmoe.quantization import dequantize_weight
    except ImportError:
        return None
    return dequantize_weight


def _dense(weight: torch.Tensor, name: str) -> torch.Tensor:
    """The dense value of a (possibly bitsandbytes-quantized) weight."""
    if weight.is_meta:
        raise UnsupportedWeightsError(f"{name} is on the meta device (offloaded); the weight analyses need it.")
    dequantize = _dequantizer()
    if dequantize is not None:
        try:
            weight = dequantize(weight)
        except Exception as err:  # whatever went wrong, these weights cannot be compared
            raise UnsupportedWeightsError(f"Could not dequantize {name} ({err}); load the model in bf16.") from err
    if not weight.is_floating_point():
        raise UnsupportedWeightsError(
            f"{name} is stored as {weight.dtype}, not as floating-point values; the weight analyses need a bf16/fp32 "
            "model or a bitsandbytes one."
        )
    return weight.detach()


def fused_expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gate_up_proj [E, 2I, H], down_proj [E, H, I])` of a routed-experts module, dequantized for the bitsandbytes
    experts of `modeling_deepseekmoe.quantization` (they provide `dequantize()`)."""
    if hasattr(experts, "dequantize"):
        try:
            return experts.dequantize()
        except Exception as err:
            raise UnsupportedWeightsError(f"Could not dequantize the routed experts ({err}).") from err
    gate_up = _dense(experts.gate_up_proj, "experts.gate_up_proj")
    down = _dense(experts.down_proj, "experts.down_proj")
    if gate_up.dim() != 3 or down.dim() != 3:
        raise UnsupportedWeightsError("The fused expert weights do not have the [E, 2I, H] / [E, H, I] layout.")
    return gate_up, down


def _projection(gate_up: torch.Tensor, down: torch.Tensor, projection: str) -> torch.Tensor:
    """One projection of every routed expert, laid out like the per-expert `nn.Linear` weights: gate/up `[E, I, H]`,
    down `[E, H, I]` (views of the fused tensors)."""
    if projection == "down":
        return down
    return gate_up.chunk(2, dim=1)[0 if projection == "gate" else 1]


def _shared_projection_slices(block: nn.Module, projection: str, width: int) -> torch.Tensor | None:
    """The shared MLP's projection cut into slices of `width` neurons, laid out like `_projection`."""
    if block.shared_experts is None:
        return None
    weight = _dense(getattr(block.shared_experts, f"{projection}_proj").weight, f"shared_experts.{projection}_proj")
    if projection == "down":
        return weight.view(weight.shape[0], -1, width).transpose(0, 1)
    return weight.view(-1, width, weight.shape[1])


def _gram(vectors: torch.Tensor) -> torch.Tensor:
    vectors = vectors.float()
    return (vectors @ vectors.T).double().cpu()


def _neuron_average(weight: torch.Tensor, projection: str) -> torch.Tensor:
    """[E, H]: gate/up averaged over their rows (neurons), down over its columns."""
    return weight.float().mean(dim=2 if projection == "down" else 1).double().cpu()


class ExpertWeightSummary:
    """Gram matrices and neuron averages of one MoE block's experts, computed one projection at a time (besides the
    layer's weights, one float32 copy of one projection is alive: ~0.75 GB per layer at the 16B size). Rows are the
    routed experts, then the shared slices S0, S1, ..."""

    def __init__(self, block: nn.Module):
        self.num_routed = block.gate.weight.shape[0]
        self.grams: dict[str, torch.Tensor] = {}
        self.neuron_means: dict[str, torch.Tensor] = {}
        num_shared = 0
        gate_up, down = fused_expert_weights(block.experts)
        width = down.shape[-1]  # moe_intermediate_size
        for projection in PROJECTIONS:
            routed = _projection(gate_up, down, projection)
            shared = _shared_projection_slices(block, projection, width)
            rows = routed.flatten(1)
            if shared is not None:
                rows = torch.cat([rows, shared.to(rows.device, rows.dtype).reshape(shared.shape[0], -1)])
                num_shared = shared.shape[0]
            self.grams[projection] = _gram(rows)
            self.neuron_means[projection] = _neuron_average(routed, projection)
        self.labels = [str(e) for e in range(self.num_routed)] + [f"S{j}" for j in range(num_shared)]
        self.router = _dense(block.gate.weight, "gate.weight").double().cpu()

    def similarity(self, projection: str = "all", include_shared: bool = True) -> torch.Tensor:
        """Cosine similarity of the flattened weights of `projection` ("all": the three concatenated)."""
        if projection not in (*PROJECTIONS, "all"):
            raise ValueError(f"projection must be one of {(*PROJECTIONS, 'all')}, got {projection!r}.")
        gram = sum(self.grams.values()) if projection == "all" else self.grams[projection]
        if not include_shared:
            gram = gram[: self.num_routed, : self.num_routed]
        return cosine_from_gram(gram)


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp(min=0).sqrt()
    return (gram / (norms[:, None] * norms[None, :]).clamp(min=1e-300)).clamp(-1.0, 1.0)


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """[M, M] cosine similarities of the rows of `vectors` [M, D]."""
    vectors = vectors.double()
    return cosine_from_gram(vectors @ vectors.T)


def expert_similarity(
    block: nn.Module, projection: str = "all", include_shared: bool = True
) -> tuple[torch.Tensor, list[str]]:
    """Cosine similarity matrix of the flattened expert weights of one MoE block (routed experts, then the shared
    slices S0, S1, ... when `include_shared`), and the label of each row."""
    summary = ExpertWeightSummary(block)
    matrix = summary.similarity(projection, include_shared)
    return matrix, summary.labels[: matrix.shape[0]]


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.tril_indices(matrix.shape[0], matrix.shape[1], offset=-1)
    return matrix[rows, cols]


def similarity_summary(matrix: torch.Tensor, num_routed: int) -> dict[str, float]:
    """Mean / max off-diagonal cosine among routed experts, and mean / max cosine between routed and shared slices."""
    routed = _off_diagonal(matrix[:num_routed, :num_routed])
    summary = {
        "routed_mean": float(routed.mean()),
        "routed_mean_abs": float(routed.abs().mean()),
        "routed_max": float(routed.max()),
    }
    if matrix.shape[0] > num_routed:
        cross = matrix[:num_routed, num_routed:]
        summary["routed_shared_mean"] = float(cross.mean())
        summary["routed_shared_max"] = float(cross.max())
    return summary


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = x.norm() * y.norm()
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def router_alignment(summary: ExpertWeightSummary) -> dict:
    """How the router rows relate to the expert weights of one MoE block (see the module docstring)."""
    router_similarity = _off_diagonal(cosine_matrix(summary.router))
    result = {
        f"pearson_{projection}": pearson(
            router_similarity, _off_diagonal(cosine_matrix(summary.neuron_means[projection]))
        )
        for projection in PROJECTIONS
    }
    num_experts = summary.num_routed
    joint = cosine_matrix(torch.cat([summary.router, summary.neuron_means["gate"]]))
    router_vs_gate = joint[:num_experts, num_experts:]
    matched = router_vs_gate.diagonal()
    mismatched = router_vs_gate[~torch.eye(num_experts, dtype=torch.bool)]
    result.update(
        matched_cosine=matched.tolist(),
        matched_cosine_mean=float(matched.mean()),
        mismatched_cosine_mean=float(mismatched.mean()),
    )
    return result


def _similarity_detail(summary: ExpertWeightSummary, layer: int) -> dict:
    return {
        "layer": layer,
        "labels": summary.labels,
        "similarity": {projection: summary.similarity(projection).tolist() for projection in (*PROJECTIONS, "all")},
    }


def static_analysis(model: nn.Module, layers: Sequence[int] | None = None, detail_layer: int | None = None) -> dict:
    """Expert similarity summaries (per projection) and router alignment of every MoE layer in `layers` (default:
    all), and the full similarity matrices (shared slices included) of `detail_layer`."""
    blocks = moe_blocks(model)
    layers = list(blocks) if layers is None else [check_moe_layer(layer, list(blocks)) for layer in layers]
    if detail_layer is not None:
        check_moe_layer(detail_layer, list(blocks))
    result = {"layers": {}}
    for layer in layers:
        summary = ExpertWeightSummary(blocks[layer])
        result["layers"][str(layer)] = {
            "similarity": {
                projection: similarity_summary(summary.similarity(projection), summary.num_routed)
                for projection in (*PROJECTIONS, "all")
            },
            "router_alignment": router_alignment(summary),
        }
        if layer == detail_layer:
            result["detail"] = _similarity_detail(summary, layer)
    if detail_layer is not None and "detail" not in result:
        result["detail"] = _similarity_detail(ExpertWeightSummary(blocks[detail_layer]), detail_layer)
    return result
