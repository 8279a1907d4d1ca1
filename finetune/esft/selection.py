"""ESFT expert selection (paper Eq. 8): per MoE layer, the smallest set of top-scored experts whose scores reach `p`
(or a fixed number per layer), written in the ESFT repository's expert-config format, plus a heatmap of the scores
with the chosen experts marked."""

import os
from pathlib import Path

from .scoring import SCORE_TYPES, ExpertScores


DEFAULT_THRESHOLDS = {"gate": 0.1, "token": 0.2}


def select_experts(
    scores: ExpertScores,
    score_type: str = "token",
    p: float | None = None,
    top_k_per_layer: int | None = None,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
) -> dict:
    """An ESFT expert config `{"experts": {"<layer>": [ids]}, "shared_experts": ..., "non_expert_modules": ...}`.
    `p` (default 0.1 for gate scores, 0.2 for token scores, as in the paper) applies to the raw per-layer scores;
    `top_k_per_layer` instead keeps a fixed number of experts in every layer."""
    if score_type not in SCORE_TYPES:
        raise ValueError(f"score_type must be one of {SCORE_TYPES}, got {score_type!r}.")
    if p is not None and top_k_per_layer is not None:
        raise ValueError("Give either p or top_k_per_layer, not both.")
    if top_k_per_layer is not None and top_k_per_layer < 1:
        raise ValueError(f"top_k_per_layer must be >= 1, got {top_k_per_layer}.")
    scores.check_finite("this scores file")
    threshold = DEFAULT_THRESHOLDS[score_type] if p is None else p
    if top_k_per_layer is None and not 0 < threshold <= 1:
        raise ValueError(f"p must be in (0, 1], got {threshold}.")
    experts = {}
    for layer, values in getattr(scores, score_type).items():
        ranked = sorted(range(len(values)), key=lambda expert: (-values[expert], expert))
        if top_k_per_layer is not None:
            chosen = ranked[:top_k_per_layer]
        else:
            chosen, total = [], 0.0
            for expert in ranked:
                chosen.append(expert)
                total += values[expert]
                if total >= threshold:
                    break
        experts[str(layer)] = sorted(chosen)
    return {"experts": experts, "shared_experts": shared_experts, "non_expert_modules": non_expert_modules}


def format_selection(expert_config: dict, num_experts: int) -> str:
    lines = []
    for layer, ids in expert_config["experts"].items():
        lines.append(f"layer {layer:>3}: {len(ids):>3}/{num_experts} experts  {ids}")
    total = sum(len(ids) for ids in expert_config["experts"].values())
    lines.append(f"total: {total} of {num_experts * len(expert_config['experts'])} routed experts selected")
    return "\n".join(lines)


def plot_selection(
    scores: ExpertScores, expert_config: dict, path: str | os.PathLike, score_type: str = "token"
) -> Path:
    """Layer x expert heatmap of the scores, the selected experts outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    values = getattr(scores, score_type)
    layers = sorted(values)
    num_experts = len(values[layers[0]])
    figure, axis = plt.subplots(figsize=(max(6, num_experts * 0.18 + 2), max(3, len(layers) * 0.3 + 1.5)))
    image = axis.imshow([values[layer] for layer in layers], aspect="auto", cmap="viridis")
    for row, layer in enumerate(layers):
        for expert in expert_config["experts"].get(str(layer), []):
            axis.add_patch(Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axis.set_xlabel("routed expert")
    axis.set_ylabel("MoE layer")
    axis.set_title(f"ESFT-{score_type.capitalize()} scores ({scores.num_tokens} tokens); selected in red")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
