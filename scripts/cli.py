"""`deepseekmoe` command line. Every subcommand is a thin layer over a library function."""

import argparse
import sys

from modeling_deepseekmoe.checkpoint import CheckpointError


def _demo(args: argparse.Namespace) -> None:
    from .demo import format_demo, run_demo

    result = run_demo(args.output_dir, seed=args.seed, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    print(format_demo(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseekmoe", description="DeepSeekMoE tools for the HF ecosystem.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="build, save, reload and run a tiny DeepSeekMoE on CPU")
    demo.add_argument("--output_dir", default="deepseekmoe-demo", help="where the demo writes its model and files")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--prompt", default="What do the experts of a mixture-of-experts model do?")
    demo.add_argument("--max_new_tokens", type=int, default=24)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError, OSError) as err:
        print(f"deepseekmoe {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
