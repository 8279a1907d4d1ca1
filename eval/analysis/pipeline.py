"""`analyze`: the whole analysis of one model on one dataset, written as JSON, PNG figures and a markdown report."""

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from modeling_deepseekmoe.routing import moe_blocks

from . import plots
from .ablation import run_ablations
from .data import TextSample, pad_token_id_of, tokenize_samples
from .norms import OutputNormCollector
from .options import ABLATION_MODES, DEFAULT_RATIOS, check_moe_layer, experts_for_ratio
from .passes import run_data_pass
from .report import write_report
from .static import UnsupportedWeightsError, static_analysis
from .statistics import RoutingStatistics, token_routing


def default_layer(model: nn.Module) -> int:
    """The middle MoE layer."""
    layers = list(moe_blocks(model))
    return layers[len(layers) // 2]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "domain"


def _json_ready(value):
    """NaN / infinity (e.g. a correlation of constant values) become null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def _write_json(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(_json_ready(data), ensure_ascii=False, indent=1, allow_nan=False), encoding="utf-8")
    return path


def _routing_plots(statistics: RoutingStatistics, output_dir: Path) -> list[Path]:
    layers = statistics.layers
    paths = [
        plots.plot_load_heatmap(
            statistics.load_share.numpy(), layers, "Expert load, all data", output_dir / "load_heatmap_all.png"
        )
    ]
    domains = statistics.domains
    if len(domains) > 1:
        loads = {domain: statistics.domain_load_share(domain).numpy() for domain in domains}
        vmax = max(load.max() for load in loads.values()) * statistics.num_experts
        for domain, load in loads.items():
            title, path = f"Expert load, domain {domain}", output_dir / f"load_heatmap_domain_{_slug(domain)}.png"
            paths.append(plots.plot_load_heatmap(load, layers, title, path, vmax=vmax))
        specialisation = statistics.specialisation().numpy()
        path = output_dir / "domain_specialisation.png"
        paths.append(plots.plot_domain_specialisation(specialisation, domains, layers, path))
    return paths


def _static_results(model: nn.Module, layer: int, output_dir: Path) -> tuple[dict, list[Path]]:
    try:
        static = static_analysis(model, detail_layer=layer)
    except UnsupportedWeightsError as err:
        return {"error": str(err)}, []
    detail = static["detail"]
    similarity_path = output_dir / f"expert_similarity_layer{layer}.png"
    paths = [
        plots.plot_expert_similarity(
            detail["similarity"]["all"], detail["labels"], layer, static["layers"], similarity_path
        ),
        plots.plot_router_alignment(static["layers"], output_dir / "router_alignment.png"),
    ]
    return static, paths


def _as_samples(samples: Sequence[TextSample | str]) -> list[TextSample]:
    """Plain strings are accepted too (domain "text")."""
    samples = [TextSample(sample, "text") if isinstance(sample, str) else sample for sample in samples]
    if not samples:
        raise ValueError("No text to analyse; pass at least one sample (see load_samples).")
    return samples


def _check_ablation_arguments(model: nn.Module, ratios: Sequence[float], modes: Sequence[str]) -> None:
    """Fail before the long routing pass rather than after it."""
    gate = next(iter(moe_blocks(model).values())).gate
    for ratio in ratios:
        experts_for_ratio(ratio, gate.weight.shape[0], gate.top_k)
    unknown = [mode for mode in modes if mode not in ABLATION_MODES]
    if unknown:
        raise ValueError(f"Unknown ablation mode(s) {unknown}; choose from {list(ABLATION_MODES)}.")


def _token_routing_section(model, tokenizer, text: str, layer: int, max_length, output_dir: Path):
    routing = token_routing(model, tokenizer, text, max_length)
    scores, experts = routing.scores[layer].numpy(), routing.experts[layer].numpy()
    path = output_dir / f"token_routing_layer{layer}.png"
    return routing.to_dict(), [plots.plot_token_routing(routing.tokens, scores, experts, layer, path)]


def _output_norm_section(norms: OutputNormCollector, layer: int, output_dir: Path):
    summary = norms.to_dict()
    scores, norm_values = norms.layer_data(layer)
    path = output_dir / f"output_norm_vs_score_layer{layer}.png"
    rank_counts = summary[str(layer)]["rank_counts"]
    return summary, [plots.plot_output_norms(scores.numpy(), norm_values.numpy(), rank_counts, layer, path)]


def analyze(
    model: nn.Module,
    tokenizer,
    samples: Sequence[TextSample | str],
    output_dir: str | Path,
    *,
    model_name: str = "model",
    max_length: int | None = 512,
    batch_size: int = 4,
    layer: int | None = None,
    text: str | None = None,
    ablation_ratios: Sequence[float] = DEFAULT_RATIOS,
    ablation_modes: Sequence[str] = ABLATION_MODES,
    ablation_samples: int | None = None,
    random_trials: int = 1,
    ablations: bool = True,
    static: bool = True,
    norm_tokens: int = 256,
    top_tokens: int = 10,
    top_token_capacity: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run every analysis and write `analysis.json`, the PNG figures and `report.md` to `output_dir`.

    One streaming pass gives the routing statistics, the baseline loss and the output norms (first `norm_tokens`
    tokens per layer); the ablations re-run the model on the first `ablation_samples` texts (default: all) per
    variant. `layer` (default: the middle MoE layer) is the layer of the per-token routing and similarity figures;
    `text` (default: the first text) is the text whose per-token routing is plotted. Returns the results dictionary,
    with `files` listing what was written.
    """
    samples = _as_samples(samples)
    layer = default_layer(model) if layer is None else check_moe_layer(layer, list(moe_blocks(model)))
    if ablations:
        _check_ablation_arguments(model, ablation_ratios, ablation_modes)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    encoded = tokenize_samples(tokenizer, samples, max_length)
    pad_token_id = pad_token_id_of(tokenizer)

    statistics = RoutingStatistics.for_model(model, top_token_capacity=top_token_capacity)
    norms = OutputNormCollector(None, norm_tokens) if norm_tokens > 0 else None
    collectors = [statistics] + ([norms] if norms else [])
    loss = run_data_pass(model, encoded, batch_size, pad_token_id, collectors, progress=progress, desc="routing")
    results = {
        "model": model_name,
        "layer": layer,
        "top_k": moe_blocks(model)[layer].gate.top_k,
        "data": {"samples": len(encoded), "domains": dict(Counter(sample.domain for sample in encoded))},
        "loss": {"loss": loss.loss, "perplexity": loss.perplexity, "tokens": loss.num_tokens},
        "routing": statistics.to_dict(tokenizer, top_tokens),
    }
    paths = _routing_plots(statistics, output_dir)
    text = samples[0].text if text is None else text
    results["token_routing"], new_paths = _token_routing_section(model, tokenizer, text, layer, max_length, output_dir)
    paths += new_paths
    if norms is not None:
        results["output_norms"], new_paths = _output_norm_section(norms, layer, output_dir)
        paths += new_paths
    if ablations:
        subset = encoded[:ablation_samples] if ablation_samples else encoded
        results["ablations"] = run_ablations(
            model,
            subset,
            ablation_ratios,
            statistics=statistics,
            baseline=loss if len(subset) == len(encoded) else None,
            modes=ablation_modes,
            random_trials=random_trials,
            batch_size=batch_size,
            pad_token_id=pad_token_id,
            seed=seed,
            progress=progress,
        )
        paths.append(plots.plot_ablations(results["ablations"], output_dir / "ablations.png"))
    if static:
        results["static"], new_paths = _static_results(model, layer, output_dir)
        paths += new_paths

    results["files"] = [path.name for path in paths] + ["analysis.json", "report.md"]
    _write_json(results, output_dir / "analysis.json")
    write_report(results, output_dir / "report.md")
    return results
