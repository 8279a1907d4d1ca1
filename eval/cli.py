"""``deepseekmoe eval``: lm-eval's own ``run`` command with the ``deepseekmoe`` model registered.

The subcommand takes every flag of ``lm-eval run`` (it is built from lm-eval's parser, so ``--tasks``,
``--num_fewshot``, ``--limit``, ``--output_path``, ``--log_samples``, ``--include_path``, ``--model_args``, ... mean
what they mean there) plus a few of its own, merged into ``--model_args``. It adds the project's task directory (the
paper suite and the tiny offline tasks) to the include path, runs lm-eval, then writes the markdown table with the
paper's numbers beside lm-eval's results JSON and, with ``--model_card``, into the evaluated checkpoint's README.md.

Wire it into an argparse program with :func:`add_eval_parser`; the parsed arguments' ``func`` runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import fields

from modeling_deepseekmoe.loading import QuantizationArguments
import os
import textwrap
import time

MODEL_NAME = "deepseekmoe"  # the lm-eval model name registered by deepseekmoe.eval.harness
_OURS = "dsmoe_"  # prefix of the destinations of this command's own flags

EPILOG = textwrap.dedent(
    """\
    examples:
      # the tiny offline suite shipped with the project, on a local checkpoint
      deepseekmoe eval --pretrained ./ckpt --tasks dsmoe_tiny --device cpu --output_path results/

      # the paper's base table (tasks lm-eval has; data from the hub) and the ones it lacks (local files)
      deepseekmoe eval --pretrained ./deepseek-moe-16b-base --dtype bfloat16 --batch_size auto \\
          --tasks paper_base,paper_base_local --data_dir ./paper-data --output_path results/ --model_card

      # a LoRA or ESFT fine-tune
      deepseekmoe eval --pretrained ./base --esft ./esft-adapter --tasks paper_base --output_path results/
    """
)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an argparse ``subparsers`` object; returns its parser."""
    parser = subparsers.add_parser(
        "eval",
        parents=_lm_eval_parents(),
        conflict_handler="resolve",
        help="evaluate with lm-evaluation-harness (paper suite, LoRA/ESFT adapters)",
        description="lm-eval's `run` command with the deepseekmoe model and the DeepSeekMoE paper suite "
        "(groups paper_base, paper_chat, paper_base_local, paper_chat_local; tiny offline suite: dsmoe_tiny).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ours = parser.add_argument_group("deepseekmoe (merged into --model_args)")
    ours.add_argument("--pretrained", dest=_OURS + "pretrained", metavar="PATH", help="checkpoint directory or hub id")
    adapter = ours.add_mutually_exclusive_group()
    adapter.add_argument("--adapter", "--adapter_name_or_path", dest=_OURS + "adapter", metavar="DIR",
                         help="a LoRA or ESFT adapter directory (recognised by its files)")
    adapter.add_argument("--peft", "--esft", dest=_OURS + "adapter", metavar="DIR", help="the same as --adapter")
    ours.add_argument("--dtype", dest=_OURS + "dtype", metavar="DTYPE", help="e.g. bfloat16, float32, auto")
    for option in fields(QuantizationArguments):  # the one set of quantization flags (nf4 + double quant, ...)
        kwargs = {"action": "store_true"} if option.default is False else {"metavar": option.name.upper()}
        ours.add_argument(f"--{option.name}", dest=_OURS + option.name, help=option.metadata.get("help"), **kwargs)
    ours.add_argument("--device_map", dest=_OURS + "device_map", metavar="MAP", help="e.g. auto (several GPUs)")
    ours.add_argument("--vllm", dest=_OURS + "vllm", action="store_true",
                      help="lm-eval's vLLM backend (released-layout checkpoints; needs vllm installed)")  # fmt: skip
    ours.add_argument("--data_dir", dest=_OURS + "data_dir", metavar="DIR",
                      help="files of the local paper tasks (*_local); same as --metadata data_dir=DIR")  # fmt: skip
    ours.add_argument("--paper_model", dest=_OURS + "paper_model", choices=("base", "chat"),
                      help="which paper column to compare with (default: chat if a paper_chat group ran)")  # fmt: skip
    ours.add_argument("--model_card", dest=_OURS + "model_card", action="store_true",
                      help="write the results table into the checkpoint's (or adapter's) README.md")  # fmt: skip
    parser.set_defaults(func=run_eval_command)
    return parser


def _lm_eval_parents() -> list[argparse.ArgumentParser]:
    """lm-eval's ``run`` parser (empty when lm-eval is not installed: the command then says how to install it)."""
    if importlib.util.find_spec("lm_eval") is None:
        return []
    return [lm_eval_run_parser()]


def lm_eval_run_parser() -> argparse.ArgumentParser:
    """The parser of ``lm-eval run``, built by lm-eval itself."""
    from lm_eval._cli.run import Run

    holder = argparse.ArgumentParser(add_help=False).add_subparsers()
    Run.create(holder)
    return holder.choices["run"]


def run_eval_command(args: argparse.Namespace) -> None:
    """Run lm-eval with the parsed arguments, then write the markdown table (and the model card)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError('lm-evaluation-harness is not installed: pip install "deepseekmoe[eval]".')
    namespace = lm_eval_namespace(args)
    if getattr(args, _OURS + "model_card"):
        if not namespace.output_path:
            raise ValueError("--model_card needs --output_path: the table is built from lm-eval's results JSON.")
        from .report import card_directory

        card_directory(namespace.model_args)  # fails now, not after the evaluation, if there is no local checkpoint
    if namespace.model == MODEL_NAME:
        from . import harness  # noqa: F401  (registers the model)
    started = time.time()
    _run_lm_eval(namespace)
    if namespace.output_path:
        report_results(namespace, started, getattr(args, _OURS + "paper_model"), getattr(args, _OURS + "model_card"))


def _run_lm_eval(namespace: argparse.Namespace) -> None:
    from lm_eval._cli.run import Run

    try:
        Run._execute(namespace)
    except ValueError as err:
        if str(err).startswith("Tasks not found"):
            raise ValueError(
                f"{err}. The paper suite: paper_base, paper_chat, paper_base_local, paper_chat_local; the tiny "
                "offline suite: dsmoe_tiny; lm-eval's tasks: `lm-eval ls tasks`."
            ) from err
        raise


def lm_eval_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """lm-eval's ``run`` arguments: its own flags as given, the model and model_args completed from ours."""
    from .harness import default_device
    from .tasks import TASKS_DIR

    known = {action.dest for action in lm_eval_run_parser()._actions}
    namespace = argparse.Namespace(**{key: value for key, value in vars(args).items() if key in known})
    use_vllm = getattr(args, _OURS + "vllm")
    namespace.model = namespace.model or ("vllm" if use_vllm else MODEL_NAME)
    namespace.model_args = _model_args(args, namespace.model_args or {}, use_vllm)
    if "pretrained" not in namespace.model_args and not namespace.config:
        raise ValueError("No model to evaluate: pass --pretrained PATH (or --model_args pretrained=PATH).")
    check_local_paths(namespace.model_args)
    namespace.include_path = [str(TASKS_DIR)] + ([namespace.include_path] if namespace.include_path else [])
    namespace.device = namespace.device or default_device()
    data_dir = getattr(args, _OURS + "data_dir")
    if data_dir:
        namespace.metadata = dict(namespace.metadata or {}, data_dir=data_dir)
    return namespace


def check_local_paths(model_args: dict) -> None:
    """A model or adapter given as a path that does not exist is named now, not after lm-eval has started (and not
    as "Repo id must be in the form ..."). Values that could be Hub repo ids ("name", "org/name") are left to it."""
    for key in ("pretrained", "adapter", "peft", "esft", "lora_local_path"):
        value = model_args.get(key)
        if isinstance(value, str) and not os.path.exists(value) and looks_like_a_path(value):
            flag = {"lora_local_path": "peft"}.get(key, key)
            raise FileNotFoundError(f"--{flag} {value}: no such directory; check the path.")


def looks_like_a_path(value: str) -> bool:
    """Not a Hub repo id: absolute, relative to . or ~, or more than one folder deep."""
    return os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1 or "\\" in value


def _model_args(args: argparse.Namespace, given: dict, use_vllm: bool) -> dict:
    """``--model_args`` with this command's own flags merged in (ours win where both are given)."""
    flags = [option.name for option in fields(QuantizationArguments)]
    names = ("pretrained", "adapter", "dtype", "device_map", *flags)
    ours = {name: getattr(args, _OURS + name) for name in names}
    ours = {key: value for key, value in ours.items() if value not in (None, False)}
    if use_vllm:
        ours = _vllm_model_args(ours)
    return {**given, **ours}


def _vllm_model_args(ours: dict) -> dict:
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--vllm needs vLLM installed (pip install vllm); without it, leave --vllm out.")
    from deepseekmoe.finetune.adapters import LORA, adapter_kind

    for unsupported in ("load_in_4bit", "load_in_8bit", "device_map"):
        if unsupported in ours:
            raise ValueError(f"--{unsupported} is not available with --vllm; use the default (HF) backend for it.")
    if "adapter" in ours:
        if adapter_kind(ours["adapter"]) != LORA:
            raise ValueError("An ESFT adapter is not available with --vllm: merge it (deepseekmoe esft merge) first.")
        ours["lora_local_path"] = ours.pop("adapter")
    return ours


def report_results(namespace: argparse.Namespace, started: float, paper_model: str | None, model_card: bool):
    """Write the markdown table beside the results JSON lm-eval just wrote, print it, and fill the model card."""
    from . import report

    results_file = report.latest_results_file(namespace.output_path, since=started)
    if results_file is None:
        print("deepseekmoe eval: lm-eval wrote no results file; no table written.")
        return None
    results = json.loads(results_file.read_text(encoding="utf-8"))
    markdown = report.markdown_report(results, paper_model)
    table_file = report.write_markdown_beside(results_file, markdown)
    print(f"\nOurs vs the paper ({table_file}):\n\n{report.markdown_table(results, paper_model)}")
    if model_card:
        card = report.write_model_card(report.card_directory(namespace.model_args), results, paper_model)
        print(f"Model card updated: {card}")
    return table_file
