"""`deepseekmoe sft` and `deepseekmoe merge`: thin command-line layers over `finetune.sft.run_sft` and
`finetune.merge.merge_adapter`.

`sft` hands its arguments to the SFT argument parser (built on first use, so other subcommands do not import TRL):
`deepseekmoe sft --help` lists every flag, named as TRL / transformers name them; `--config run.yaml` reads them from a
file. Several processes: `accelerate launch --config_file finetune/configs/ddp_cpu.yaml -m deepseekmoe.finetune.sft
...` (the module takes the same arguments).
"""

import argparse


def add_sft_parser(subparsers) -> argparse.ArgumentParser:
    # Every argument goes to the SFT parser unchanged (no option prefix here, so nothing is interpreted twice).
    parser = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning: full, LoRA, QLoRA (TRL SFTTrainer); `deepseekmoe sft --help` for the flags",
        add_help=False,
        prefix_chars="\0",
    )
    parser.add_argument("sft_argv", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_run_sft)
    return parser


def _run_sft(args: argparse.Namespace) -> None:
    from .sft import parse_sft_args, run_sft

    result = run_sft(*parse_sft_args(args.sft_argv, prog="deepseekmoe sft"))
    if result.skipped:
        print(result.skipped)
    elif result.summary is not None:
        print(f"Saved to {result.output_dir}. Run summary: {result.summary}")


def add_merge_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge",
        help="merge a LoRA/QLoRA adapter into its base; writes a plain checkpoint in the released layout",
    )
    parser.add_argument("--model_name_or_path", required=True, help="the base checkpoint the adapter was trained on")
    parser.add_argument("--adapter_name_or_path", required=True, help="the adapter (an SFT output or checkpoint dir)")
    parser.add_argument("--output_dir", required=True, help="where the merged checkpoint is written")
    from modeling_deepseekmoe.loading import DTYPES

    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="dtype of the merged weights (auto: the base checkpoint's)")
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "4bit", "8bit"],
                        help="merge into the dequantized 4/8-bit base the adapter was trained on (auto: as recorded "
                        "in the run's sft_run.json) or into the full-precision base (none)")
    parser.add_argument("--tokenizer_name_or_path", default=None, help="tokenizer to save (default: the adapter's)")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output_dir (never the base or the adapter)")
    parser.set_defaults(func=_run_merge)
    return parser


def _run_merge(args: argparse.Namespace) -> None:
    from .merge import merge_adapter

    output = merge_adapter(
        args.model_name_or_path,
        args.adapter_name_or_path,
        args.output_dir,
        dtype=args.dtype,
        quantization=args.quantization,
        tokenizer_name_or_path=args.tokenizer_name_or_path,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"Merged checkpoint written to {output}")
