"""PNG figures of the analysis. Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend
switch), so this works headless and leaves a notebook's backend alone."""

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="tight")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Token labels may hold characters the default font lacks (CJK, the DeepSeek special-token bars).
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure.savefig(path, dpi=120)
    return path



def _expert_ticks(axis, num_experts: int, which: str = "x") -> None:
    step = max(1, num_experts // 16)
    ticks = list(range(0, num_experts, step))
    (axis.set_xticks if which == "x" else axis.set_yticks)(ticks)


def plot_load_heatmap(
    load_share: np.ndarray, layers: Sequence[int], title: str, path: str | Path, vmax: float | None = None
) -> Path:
    """Layer x expert heatmap of the load relative to uniform (load share x E: 1 is a balanced expert); a common
    `vmax` makes the heatmaps of several domains comparable."""
    load_share = np.asarray(load_share, dtype=float)
    num_experts = load_share.shape[1]
    figure = _figure(max(6.0, 0.12 * num_experts + 2), max(2.5, 0.25 * len(layers) + 1.5))
    axis = figure.add_subplot()
    relative = load_share * num_experts
    image = axis.imshow(relative, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    _expert_ticks(axis, num_experts)
    axis.set_xlabel("routed expert")
    axis.set_ylabel("layer")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="load / uniform load")
    return _save(figure, path)


def plot_token_routing(
    tokens: Sequence[str], scores: np.ndarray, experts: np.ndarray, layer: int, path: str | Path, max_tokens: int = 64
) -> Path:
    """Tokens x experts heatmap of the router probabilities of one layer; the experts each token used are circled."""
    scores, experts = np.asarray(scores, dtype=float)[:max_tokens], np.asarray(experts)[:max_tokens]
    tokens = [repr(token)[1:-1] or " " for token in tokens[:max_tokens]]
    num_tokens, num_experts = scores.shape
    figure = _figure(max(6.0, 0.14 * num_experts + 3), max(3.0, 0.22 * num_tokens + 1.5))
    axis = figure.add_subplot()
    image = axis.imshow(scores, aspect="auto", cmap="Blues", interpolation="nearest")
    rows = np.repeat(np.arange(num_tokens), experts.shape[1])
    axis.scatter(experts.reshape(-1), rows, s=18, facecolors="none", edgecolors="red", linewidths=0.8)
    axis.set_yticks(range(num_tokens), tokens, fontsize=7)
    _expert_ticks(axis, num_experts)
    axis.set_xlabel("routed expert (circled: selected)")
    axis.set_title(f"Per-token routing, layer {layer}")
    figure.colorbar(image, ax=axis, label="router probability")
    return _save(figure, path)


def plot_domain_specialisation(
    specialisation: np.ndarray, domains: Sequence[str], layers: Sequence[int], path: str | Path
) -> Path:
    """Domain x layer heatmap of the specialisation score (total variation distance to the other domains' routing)."""
    specialisation = np.asarray(specialisation, dtype=float)
    figure = _figure(max(6.0, 0.3 * len(layers) + 3), max(2.5, 0.4 * len(domains) + 1.5))
    axis = figure.add_subplot()
    image = axis.imshow(specialisation, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    axis.set_yticks(range(len(domains)), list(domains))
    axis.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    axis.set_xlabel("layer")
    axis.set_title("Domain specialisation (0: routed like the other domains, 1: disjoint experts)")
    figure.colorbar(image, ax=axis, label="total variation distance")
    return _save(figure, path)


def plot_ablations(ablations: dict, path: str | Path) -> Path:
    """Loss vs ratio of disabled routed experts per mode, with the baseline and the no-shared-expert losses."""
    figure = _figure(7.0, 4.5)
    axis = figure.add_subplot()
    baseline = ablations["baseline"]["loss"]
    for mode in dict.fromkeys(row["variant"] for row in ablations["rows"]):
        rows = sorted((r for r in ablations["rows"] if r["variant"] == mode), key=lambda r: r["ratio"])
        axis.plot([0.0] + [r["ratio"] for r in rows], [baseline] + [r["loss"] for r in rows], marker="o", label=mode)
    axis.axhline(baseline, color="black", linewidth=0.8, label="baseline")
    for row, style in zip(ablations.get("shared", []), ("--", ":")):
        axis.axhline(row["loss"], color="gray", linestyle=style, label=f"{row['variant']} (k={row['top_k']})")
    axis.set_xlabel("ratio of routed experts disabled")
    axis.set_ylabel("loss (nats / token)")
    axis.set_title("Expert ablations")
    axis.legend(fontsize=8)
    return _save(figure, path)


def _plot_by_layer(axis, per_layer: dict, value, **style) -> None:
    """One line over the layers of `per_layer` (keys are layer numbers as strings); `value(entry)` gives the y."""
    layers = sorted(per_layer, key=int)
    axis.plot([int(layer) for layer in layers], [value(per_layer[layer]) for layer in layers], **style)
    axis.set_xlabel("layer")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_expert_similarity(
    matrix: np.ndarray, labels: Sequence[str], layer: int, per_layer: dict, path: str | Path
) -> Path:
    """Left: cosine similarity of the experts' weights in one layer. Right: mean off-diagonal cosine per layer."""
    matrix = np.asarray(matrix, dtype=float)
    figure = _figure(12.0, 5.0)
    left, right = figure.subplots(1, 2)
    image = left.imshow(matrix, cmap="coolwarm", vmin=-1.0, vmax=1.0, interpolation="nearest")
    step = max(1, len(labels) // 16)
    shown = list(range(0, len(labels), step)) + [i for i, label in enumerate(labels) if label.startswith("S")]
    shown = sorted(set(shown))
    left.set_xticks(shown, [labels[i] for i in shown], fontsize=7)
    left.set_yticks(shown, [labels[i] for i in shown], fontsize=7)
    left.set_title(f"Expert weight cosine, layer {layer} (S: shared slices)")
    figure.colorbar(image, ax=left)
    for projection in ("gate", "up", "down", "all"):
        _plot_by_layer(
            right,
            per_layer,
            lambda entry: entry["similarity"][projection]["routed_mean"],
            marker=".",
            label=f"routed, {projection}",
        )
    if "routed_shared_mean" in next(iter(per_layer.values()))["similarity"]["all"]:
        _plot_by_layer(
            right,
            per_layer,
            lambda entry: entry["similarity"]["all"]["routed_shared_mean"],
            linestyle="--",
            label="routed vs shared, all",
        )
    right.set_ylabel("mean off-diagonal cosine")
    right.set_title("Expert weight similarity by layer")
    right.legend(fontsize=8)
    return _save(figure, path)


def plot_router_alignment(per_layer: dict, path: str | Path) -> Path:
    """Per layer: Lo et al.'s Pearson R between router-row and neuron-averaged expert similarities, and the cosine
    of each router row with its own expert's averaged gate_proj vs with the other experts'."""
    figure = _figure(11.0, 4.0)
    left, right = figure.subplots(1, 2)
    for projection in ("gate", "up", "down"):
        _plot_by_layer(
            left,
            per_layer,
            lambda entry: entry["router_alignment"][f"pearson_{projection}"],
            marker="o",
            label=f"{projection}_proj",
        )
    left.axhline(0.0, color="black", linewidth=0.6)
    left.set_ylabel("Pearson R")
    left.set_title("Router-row vs expert similarity (Lo et al.)")
    left.legend(fontsize=8)
    alignment = {layer: entry["router_alignment"] for layer, entry in per_layer.items()}
    _plot_by_layer(right, alignment, lambda entry: entry["matched_cosine_mean"], marker="o", label="own expert")
    _plot_by_layer(right, alignment, lambda entry: entry["mismatched_cosine_mean"], marker="x", label="other experts")
    right.axhline(0.0, color="black", linewidth=0.6)
    right.set_ylabel("cosine")
    right.set_title("Router row vs neuron-averaged gate_proj")
    right.legend(fontsize=8)
    return _save(figure, path)


def plot_output_norms(
    scores: np.ndarray, norms: np.ndarray, rank_counts, layer: int, path: str | Path, max_points: int = 20000
) -> Path:
    """Left: router probability vs expert output norm (every token x expert pair). Right: rank-count matrix."""
    scores, norms = np.asarray(scores, dtype=float).reshape(-1), np.asarray(norms, dtype=float).reshape(-1)
    if scores.size > max_points:
        keep = np.random.default_rng(0).choice(scores.size, max_points, replace=False)
        scores, norms = scores[keep], norms[keep]
    figure = _figure(11.0, 4.5)
    left, right = figure.subplots(1, 2)
    left.scatter(norms, scores, s=3, alpha=0.4)
    left.set_xlabel("expert output norm")
    left.set_ylabel("router probability")
    left.set_title(f"Output norm vs router score, layer {layer}")
    image = right.imshow(np.asarray(rank_counts, dtype=float), cmap="viridis", interpolation="nearest")
    right.set_xlabel("output norm rank (0 = largest)")
    right.set_ylabel("router score rank (0 = highest)")
    right.set_title("Rank counts")
    figure.colorbar(image, ax=right, label="tokens")
    return _save(figure, path)
