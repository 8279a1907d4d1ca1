"""The `deepseekmoe analyze` subcommand: `add_analyze_parser(subparsers)` adds it to an argparse parser."""

import argparse
import os
from pathlib import Path

from .options import ABLATION_MODES, check_moe_layer, experts_for_ratio, parse_ratios


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze",
        help="expert routing statistics, ablations and weight analyses of a DeepSeekMoE checkpoint on local text",
        description=(
            "Routing statistics per layer and expert (load, weights, balance, domains, top tokens), per-token "
            "routing, expert ablations (paper Section 4.5), weight similarity / router alignment / output norms "
            "(Lo et al. 2024). Writes analysis.json, PNG figures and report.md to --output_dir."
        ),
    )
    parser.add_argument("model", help="model directory (or hub id) loadable with AutoModelForCausalLM")
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help=".txt (one text per line, domain = file name) and/or .jsonl files (fields --text_field, --domain_field)",
    )
    parser.add_argument("--text_field", default="text", help="JSONL field holding the text")
    parser.add_argument("--domain_field", default="domain", help="JSONL field holding the domain (optional per row)")
    parser.add_argument("--output_dir", default="deepseekmoe-analysis")
    parser.add_argument("--max_samples", type=int, default=1000, help="texts read from --data, in order")
    parser.add_argument("--max_length", type=int, default=512, help="tokens per text (longer texts are truncated)")
    parser.add_argument("--batch_size", type=int, default=4)
    from deepseekmoe.finetune.adapters import add_loading_arguments

    add_loading_arguments(parser)  # --adapter, --dtype, --device_map, --load_in_4bit/8bit, bnb_*: as everywhere
    parser.add_argument(
        "--ablation_ratios", default="1/16,2/16,3/16,4/16", help="comma-separated ratios of routed experts to disable"
    )
    parser.add_argument(
        "--ablation_modes", default=",".join(ABLATION_MODES), help=f"subset of {','.join(ABLATION_MODES)}"
    )
    parser.add_argument("--ablation_samples", type=int, default=None, help="texts for the ablations (default: all)")
    parser.add_argument("--random_trials", type=int, default=1, help="draws averaged for the random ablations")
    parser.add_argument("--no_ablations", action="store_true", help="skip the ablations")
    parser.add_argument("--no_static", action="store_true", help="skip the weight analyses")
    parser.add_argument(
        "--norm_tokens", type=int, default=256, help="tokens per layer for output norm vs score (0: skip)"
    )
    parser.add_argument("--layer", type=int, default=None, help="MoE layer of the per-token and similarity figures")
    parser.add_argument("--text", default=None, help="text whose per-token routing is plotted (default: first text)")
    parser.add_argument("--top_tokens", type=int, default=10, help="top tokens reported per expert")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_analyze)
    return parser


def _load_model(args: argparse.Namespace):
    import torch

    from deepseekmoe.finetune.adapters import load_model, loading_options

    options = loading_options(args)
    options["device_map"] = options["device_map"] or ("auto" if torch.cuda.is_available() else None)
    return load_model(args.model, **options)


def _check_arguments(args: argparse.Namespace, ratios: list[float], modes: list[str]) -> None:
    """Fail on bad arguments before the (possibly long) model load."""
    from transformers import AutoConfig

    import modeling_deepseekmoe  # noqa: F401

    from ..cli import looks_like_a_path

    if not os.path.exists(args.model) and looks_like_a_path(args.model):
        raise FileNotFoundError(f"{args.model}: no such model directory; check the path.")
    for name in ("batch_size", "max_samples", "random_trials"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    unknown = [mode for mode in modes if mode not in ABLATION_MODES]
    if unknown:
        raise ValueError(f"Unknown --ablation_modes {unknown}; choose from {','.join(ABLATION_MODES)}.")
    config = AutoConfig.from_pretrained(args.model)
    if not config.moe_layer_indices:
        raise ValueError(f"{args.model} has no MoE layer (n_routed_experts is None); there is no routing to analyse.")
    if args.layer is not None:
        check_moe_layer(args.layer, config.moe_layer_indices)
    if not args.no_ablations:
        for ratio in ratios:
            experts_for_ratio(ratio, config.n_routed_experts, config.num_experts_per_tok)


def run_analyze(args: argparse.Namespace) -> dict:
    from deepseekmoe.finetune.adapters import load_tokenizer

    from .data import load_samples
    from .pipeline import analyze

    ratios = parse_ratios(args.ablation_ratios)
    modes = [mode.strip() for mode in args.ablation_modes.split(",") if mode.strip()]
    _check_arguments(args, ratios, modes)
    tokenizer = load_tokenizer(args.model, args.adapter)  # chat rows are rendered through its template
    samples = load_samples(args.data, args.text_field, args.domain_field, args.max_samples, tokenizer=tokenizer)
    model = _load_model(args)
    results = analyze(
        model,
        tokenizer,
        samples,
        args.output_dir,
        model_name=str(args.model),
        max_length=args.max_length,
        batch_size=args.batch_size,
        layer=args.layer,
        text=args.text,
        ablation_ratios=ratios,
        ablation_modes=modes,
        ablation_samples=args.ablation_samples,
        random_trials=args.random_trials,
        ablations=not args.no_ablations,
        static=not args.no_static,
        norm_tokens=args.norm_tokens,
        top_tokens=args.top_tokens,
        seed=args.seed,
    )
    output_dir = Path(args.output_dir)
    print(f"Loss {results['loss']['loss']:.4f} on {results['loss']['tokens']} tokens; wrote to {output_dir}:")
    for name in results["files"]:
        print(f"  {output_dir / name}")
    return results
