"""Expert routing analysis of DeepSeekMoE models: what the experts do, shown as numbers and plots.

Library use (e.g. from a notebook)::

    from deepseekmoe.eval.analysis import (
        analyze, collect_routing_statistics, load_samples, run_ablations, static_analysis, token_routing,
        tokenize_samples,
    )

    samples = load_samples(["code.jsonl", "math.txt"])           # TextSample(text, domain)
    results = analyze(model, tokenizer, samples, "analysis-out")  # everything: JSON + PNG + report.md

    encoded = tokenize_samples(tokenizer, samples, max_length=512)
    stats, loss = collect_routing_statistics(model, encoded)      # one streaming pass
    stats.load_share, stats.balance(), stats.specialisation(), stats.top_experts(layer=5, domain="code")
    run_ablations(model, encoded, ratios=[1/16, 2/16], statistics=stats)

    with disable_experts(model, {5: [3, 17]}):                     # any forward in here runs without them
        ...
    with without_shared_experts(model):
        ...

Command line: `deepseekmoe analyze MODEL --data FILE ...` (`cli.add_analyze_parser`).
"""

import importlib


# name -> submodule; imported on first use, so `deepseekmoe.eval.analysis.cli` (the CLI parser) stays light.
_EXPORTS = {
    "ABLATION_MODES": "options",
    "DEFAULT_RATIOS": "options",
    "experts_for_ratio": "options",
    "parse_ratios": "options",
    "run_ablations": "ablation",
    "EncodedSample": "data",
    "TextSample": "data",
    "iter_batches": "data",
    "load_samples": "data",
    "tokenize_samples": "data",
    "RouterOutput": "hooks",
    "disable_experts": "hooks",
    "record_routing": "hooks",
    "moe_blocks": "hooks",
    "routing_override": "hooks",
    "without_shared_experts": "hooks",
    "OutputNormCollector": "norms",
    "expert_output_norms": "norms",
    "LossResult": "passes",
    "evaluate_loss": "passes",
    "run_data_pass": "passes",
    "analyze": "pipeline",
    "ExpertWeightSummary": "static",
    "UnsupportedWeightsError": "static",
    "expert_similarity": "static",
    "router_alignment": "static",
    "static_analysis": "static",
    "RoutingStatistics": "statistics",
    "TokenRouting": "statistics",
    "TopTokenCounter": "statistics",
    "collect_routing_statistics": "statistics",
    "token_routing": "statistics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
