"""`deepseekmoe` command line. Every subcommand is a thin layer over a library function; a failure ends with one
line naming the problem and the fix and exit code 1 (2 for argument errors, which also print a one-line usage), not a
traceback: `deepseekmoe --debug ...` shows it."""

import argparse
import json
import os
import re
import sys


GENERATION_FLAGS = ("max_new_tokens", "do_sample", "temperature", "top_p")


def _demo(args: argparse.Namespace) -> None:
    from .demo import format_demo, run_demo

    print(format_demo(run_demo(args.output_dir, seed=args.seed, fast=args.fast)))


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    from deepseekmoe.finetune.adapters import add_loading_arguments

    parser.add_argument("model_name_or_path", help="checkpoint directory (released layout) or hub id")
    add_loading_arguments(parser)  # --adapter, --dtype, --device_map, --load_in_4bit/8bit, bnb_*: as everywhere
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--do_sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top_p", type=float, default=None)


def _generation_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}


def _load(args: argparse.Namespace):
    from deepseekmoe.eval.inference import load_for_inference
    from deepseekmoe.finetune.adapters import loading_options

    return load_for_inference(args.model_name_or_path, **loading_options(args))


def _chat(args: argparse.Namespace) -> None:
    from deepseekmoe.eval.inference import chat_loop, generate_reply, load_messages

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
    from deepseekmoe.eval.inference import generate_text

    model, tokenizer = _load(args)
    print(generate_text(model, tokenizer, args.prompt, **_generation_kwargs(args)))


def _convert(args: argparse.Namespace) -> None:
    from .convert import check_checkpoint, convert_checkpoint

    if args.output_dir is None:
        summary = check_checkpoint(args.checkpoint)
    else:
        summary = convert_checkpoint(args.checkpoint, args.output_dir, args.dtype, args.max_shard_size,
                                     overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))


def _footprint(args: argparse.Namespace) -> None:
    from .footprint import load_config, print_footprint

    print_footprint(load_config(args.config))


def _env(args: argparse.Namespace) -> None:
    from modeling_deepseekmoe.environment import collect_environment, format_environment

    report = collect_environment()
    print(json.dumps(report, indent=2) if args.json else format_environment(report))


class BriefUsageParser(argparse.ArgumentParser):
    """Argument errors print one usage line pointing at `--help`, not the whole usage (lm-eval's is ~60 lines)."""

    def error(self, message):
        usage = f"usage: {self.prog} [options] (`{self.prog} --help` lists them)"
        self.exit(2, f"{usage}\n{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = BriefUsageParser(prog="deepseekmoe", description="DeepSeekMoE tools for the HF ecosystem.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also after the command)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=BriefUsageParser)

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
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DEEPSEEKMOE_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]  # accepted anywhere: sft / esft train pass the rest on verbatim
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, [args.command, getattr(args, "esft_command", None)]))
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"deepseekmoe {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        print(f"deepseekmoe {command}: error: {describe_error(err)}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Errors as one line


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def describe_error(err: BaseException) -> str:
    """One line naming what went wrong and the fix, for any error a command can end with. Errors of the project and
    of bad input (config validation, a corrupt shard, a refused pickle, a full disk, a diverged run) keep their
    message, made one line; anything else is named as unexpected, with --debug for the traceback."""
    from modeling_deepseekmoe.checkpoint_writer import DiskFullError, is_disk_full

    if isinstance(err, DiskFullError):
        return str(err)
    if is_disk_full(err):
        where = getattr(err, "filename", None) or _file_in_traceback(err) or "the output directory"
        return str(DiskFullError(where))
    described = _describe_known(err)
    if described is not None:
        return _one_line(described)
    if isinstance(err, (ValueError, OSError, ImportError, _training_diverged_error())):
        return _one_line(str(err)) or type(err).__name__
    if _is_config_validation_error(err):
        return _one_line(f"invalid config: {err}. Fix config.json (or the flag that sets this value).")
    return _one_line(f"unexpected {type(err).__name__}: {err} (rerun with --debug for the traceback and report it)")


def _describe_known(err: BaseException) -> str | None:
    """Errors whose own message does not say which file or what to do."""
    import pickle

    from huggingface_hub.errors import HFValidationError
    from safetensors import SafetensorError

    if isinstance(err, SafetensorError):
        shard = _file_in_traceback(err) or "a .safetensors file"
        return f"{shard} is corrupt or truncated ({err}); download or write it again."
    if isinstance(err, pickle.UnpicklingError):
        shard = _file_in_traceback(err) or "a .bin weights file"
        blocked = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(err))
        what = f" ({blocked.group(1)})" if blocked else ""
        return (f"{shard} was refused: it holds pickled objects other than tensors{what}, which could run code "
                "(loaded with weights_only=True). Use a safetensors copy, or convert it where you trust its source.")
    if isinstance(err, (HFValidationError, OSError)) and str(err).startswith("Repo id must be in the form"):
        value = re.search(r"'([^']*)'\.?\s*(?:Use|$)", str(err))
        path = value.group(1) if value else "the model path"
        return f"{path}: no such local directory (and not a Hub repo id); check the path."
    return None


def _training_diverged_error() -> type:
    try:
        from deepseekmoe.finetune.callbacks import TrainingDivergedError
    except ImportError:  # the training extras are not installed: no run can have diverged
        return ValueError
    return TrainingDivergedError


def _is_config_validation_error(err: BaseException) -> bool:
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return False
    return isinstance(err, StrictDataclassError)


def _file_in_traceback(err: BaseException) -> str | None:
    """The weights file being read where `err` was raised: the innermost frame holding a path to one (the readers
    of safetensors and torch.load do not put it in their messages)."""
    frames = []
    traceback = err.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)) and str(value).endswith(WEIGHT_SUFFIXES):
                return str(value)
    return None


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


if __name__ == "__main__":
    sys.exit(main())
