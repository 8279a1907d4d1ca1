"""`deepseekmoe` command line. Every subcommand is a thin layer over a library function; user mistakes end with a
one-line error and a non-zero exit code, not a traceback."""

import argparse
import json
import sys


GENERATION_FLAGS = ("max_new_tokens", "do_sample", "temperature", "top_p")


def _demo(args: argparse.Namespace) -> None:
    from .demo import format_demo, run_demo

    print(format_demo(run_demo(args.output_dir, seed=args.seed, fast=args.fast)))


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_name_or_path", help="checkpoint directory (released layout)")
    parser.add_argument("--adapter", default=None, help="a LoRA or ESFT adapter directory to apply")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--load_in_4bit", action="store_true", help="quantize to 4-bit (bitsandbytes nf4)")
    parser.add_argument("--device_map", default=None, help='e.g. "auto" to spread over the GPUs')
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--do_sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top_p", type=float, default=None)


def _generation_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}


def _load(args: argparse.Namespace):
    from .inference import load_for_inference

    return load_for_inference(args.model_name_or_path, args.adapter, args.dtype, args.load_in_4bit, args.device_map)


def _chat(args: argparse.Namespace) -> None:
    from .inference import chat_loop, generate_reply, load_messages

    model, tokenizer = _load(args)
    if args.message is None and args.messages_file is None:
        chat_loop(model, tokenizer, system=args.system, **_generation_kwargs(args))
        return
    messages = load_messages(args.messages_file) if args.messages_file else []
    if args.system and not messages:
        messages.append({"role": "system", "content": args.system})
    if args.message:
        messages.append({"role": "user", "content": args.message})
    generate_reply(model, tokenizer, messages, stream=sys.stdout, **_generation_kwargs(args))


def _generate(args: argparse.Namespace) -> None:
    from .inference import generate_text

    model, tokenizer = _load(args)
    print(generate_text(model, tokenizer, args.prompt, **_generation_kwargs(args)))


def _convert(args: argparse.Namespace) -> None:
    from .convert import check_checkpoint, convert_checkpoint

    if args.output_dir is None:
        summary = check_checkpoint(args.checkpoint)
    else:
        summary = convert_checkpoint(args.checkpoint, args.output_dir, args.dtype, args.max_shard_size)
    print(json.dumps(summary, indent=2))


def _footprint(args: argparse.Namespace) -> None:
    from .footprint import load_config, print_footprint

    print_footprint(load_config(args.config))


def _env(args: argparse.Namespace) -> None:
    from modeling_deepseekmoe.environment import collect_environment, format_environment

    report = collect_environment()
    print(json.dumps(report, indent=2) if args.json else format_environment(report))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseekmoe", description="DeepSeekMoE tools for the HF ecosystem.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the whole workflow on a tiny DeepSeekMoE, on CPU")
    demo.add_argument("--output_dir", default="deepseekmoe-demo", help="where the demo writes its models and files")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--fast", action="store_true", help="fewer steps and examples (what the tests run)")
    demo.set_defaults(func=_demo)

    convert = commands.add_parser("convert", help="check a released checkpoint; rewrite it with --output_dir")
    convert.add_argument("checkpoint", help="the downloaded checkpoint directory (never modified)")
    convert.add_argument("--output_dir", default=None, help="write a converted copy here (safetensors)")
    convert.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    convert.add_argument("--max_shard_size", default="5GB")
    convert.set_defaults(func=_convert)

    chat = commands.add_parser("chat", help="chat through the DeepSeek chat template, streaming the reply")
    _add_model_flags(chat)
    chat.add_argument("--message", default=None, help="one-shot: this user message (else interactive)")
    chat.add_argument("--messages_file", default=None, help="one-shot: a JSON list of messages")
    chat.add_argument("--system", default=None, help="an optional system prompt")
    chat.set_defaults(func=_chat)

    generate = commands.add_parser("generate", help="complete a plain-text prompt")
    _add_model_flags(generate)
    generate.add_argument("--prompt", required=True)
    generate.set_defaults(func=_generate)

    footprint = commands.add_parser("footprint", help="bytes per component in bf16, 8-bit and 4-bit")
    footprint.add_argument("--config", default=None, help="a config.json or checkpoint dir (default: the 16B)")
    footprint.set_defaults(func=_footprint)

    env = commands.add_parser("env", help="versions, CPU/GPU capabilities and kernel paths, for bug reports")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(func=_env)

    from deepseekmoe.eval.analysis.cli import add_analyze_parser
    from deepseekmoe.eval.cli import add_eval_parser
    from deepseekmoe.finetune.cli import add_merge_parser, add_sft_parser
    from deepseekmoe.finetune.esft.cli import add_esft_parser

    add_sft_parser(commands)
    add_merge_parser(commands)
    add_esft_parser(commands)
    add_eval_parser(commands)
    add_analyze_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError, ImportError) as err:
        print(f"deepseekmoe {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"deepseekmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
