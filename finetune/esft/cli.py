"""`deepseekmoe esft score|select|train|merge`: thin layers over `finetune.esft`."""

import argparse
import json
from pathlib import Path

from ..adapters import add_loading_arguments, loading_options


def add_esft_parser(subparsers) -> argparse.ArgumentParser:
    esft = subparsers.add_parser("esft", help="Expert-Specialized Fine-Tuning: score, select, train, merge")
    steps = esft.add_subparsers(dest="esft_command", required=True)

    score = steps.add_parser("score", help="score every routed expert on task data (ESFT-Gate and ESFT-Token)")
    score.add_argument("--model_name_or_path", required=True)
    score.add_argument("--dataset_name", required=True, help="task data: .json/.jsonl/.parquet/.csv or a folder")
    score.add_argument("--output_file", required=True, help="where the scores JSON is written")
    score.add_argument("--dataset_format", default="auto", choices=["auto", "messages", "prompt_completion", "text"])
    score.add_argument("--num_sequences", type=int, default=32, help="probe sequences (paper: 32)")
    score.add_argument("--sequence_length", type=int, default=4096, help="tokens per probe sequence (paper: 4096)")
    score.add_argument("--all_tokens", action="store_true", help="score prompt tokens too, not only the trained ones")
    add_loading_arguments(score)  # --adapter, --dtype, --device_map, --load_in_4bit / 8bit, bnb_*: the one loader
    score.set_defaults(func=_score)

    select = steps.add_parser("select", help="choose experts from scores; writes an ESFT expert config")
    select.add_argument("--scores_file", required=True)
    select.add_argument("--output_file", required=True, help="the expert config JSON (ESFT repository format)")
    select.add_argument("--score_function", default="token", choices=["token", "gate"])
    select.add_argument("--top_p", type=float, default=None, help="cumulative score per layer (0.2 token, 0.1 gate)")
    select.add_argument("--top_k_per_layer", type=int, default=None, help="a fixed number of experts per layer")
    select.add_argument("--train_shared_experts", action="store_true")
    select.add_argument("--train_non_expert_modules", action="store_true")
    select.add_argument("--plot_file", default=None, help="heatmap PNG (default: beside the output file)")
    select.set_defaults(func=_select)

    train = steps.add_parser(
        "train", help="train only the selected experts (SFT flags + --expert_config); `esft train --help`",
        add_help=False, prefix_chars="\0",
    )  # fmt: skip
    train.add_argument("train_argv", nargs=argparse.REMAINDER)
    train.set_defaults(func=_train)

    merge = steps.add_parser("merge", help="base + ESFT adapter -> a full checkpoint in the released layout")
    merge.add_argument("--model_name_or_path", required=True)
    merge.add_argument("--adapter_name_or_path", required=True)
    merge.add_argument("--output_dir", required=True)
    merge.add_argument("--dtype", default="auto")
    merge.add_argument("--max_shard_size", default="5GB")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    merge.set_defaults(func=_merge)
    return esft


def _score(args: argparse.Namespace) -> None:
    from deepseekmoe.eval.inference import load_for_inference

    from .scoring import score_experts, scoring_sequences

    model, tokenizer = load_for_inference(args.model_name_or_path, **loading_options(args))
    sequences = scoring_sequences(args.dataset_name, tokenizer, args.sequence_length, args.num_sequences,
                                  args.all_tokens, args.dataset_format)
    scores = score_experts(model, sequences)
    path = scores.save(args.output_file)
    print(f"Scored {scores.num_tokens} tokens in {scores.num_sequences} sequences -> {path}")


def _select(args: argparse.Namespace) -> None:
    from .scoring import ExpertScores
    from .selection import format_selection, plot_selection, select_experts

    scores = ExpertScores.load(args.scores_file)
    config = select_experts(scores, args.score_function, args.top_p, args.top_k_per_layer,
                            args.train_shared_experts, args.train_non_expert_modules)
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(config, indent=2) + "\n")
    plot = plot_selection(scores, config, args.plot_file or output.with_suffix(".png"), args.score_function)
    print(format_selection(config, scores.config["n_routed_experts"]))
    print(f"Expert config -> {output}; heatmap -> {plot}")


def _train(args: argparse.Namespace) -> None:
    from .train import parse_esft_args, run_esft

    result = run_esft(*parse_esft_args(args.train_argv, prog="deepseekmoe esft train"))
    if result.skipped:
        print(result.skipped)
        return
    print(f"ESFT adapter saved to {result.output_dir}. Run summary: {result.summary}")


def _merge(args: argparse.Namespace) -> None:
    from .merge import merge_esft_adapter

    output = merge_esft_adapter(
        args.model_name_or_path, args.adapter_name_or_path, args.output_dir, args.dtype, args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"Merged checkpoint -> {output}")
