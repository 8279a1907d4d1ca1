"""Results tables: lm-eval's results beside the paper's numbers, as markdown files and in model cards."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from . import suite

# lm-eval metrics that are fractions, shown in percent like the paper's table.
PERCENT_METRICS = {"acc", "acc_norm", "exact_match", "em", "f1", "pass@1", "pass_at_1", "math_verify", "mcc"}


@dataclass(frozen=True)
class Row:
    task: str
    metric: str  # "<metric>,<filter>" as in lm-eval's JSON
    value: float | None
    stderr: float | None
    shots: int | None
    paper: float | None = None
    paper_shots: int | None = None
    note: str = ""


def paper_model_for(results: dict) -> str:
    """``chat`` when a chat group of the paper suite was run, else ``base``."""
    ran = set(results.get("results", {})) | set(results.get("group_subtasks", {}))
    return "chat" if ran & {"paper_chat", "paper_chat_local"} else "base"


def result_rows(results: dict, paper_model: str | None = None) -> list[Row]:
    """One row per (task, metric) of lm-eval's results; subtasks of an aggregated group are left to the group."""
    paper_model = paper_model or paper_model_for(results)
    hidden = _aggregated_subtasks(results)
    rows = []
    for task, metrics in results.get("results", {}).items():
        if task not in hidden:
            rows.extend(_task_rows(task, metrics, results.get("n-shot", {}).get(task), paper_model))
    return rows


def _task_rows(task: str, metrics: dict, shots, paper_model: str) -> list[Row]:
    reference = suite.paper_reference(task, paper_model)
    rows = []
    for key, value in metrics.items():
        name, _, filter_name = key.partition(",")
        if not filter_name or name.endswith("_stderr") or not _is_number(value):
            continue
        scale = reference.scale if reference and key == reference.metric else _default_scale(name)
        stderr = metrics.get(f"{name}_stderr,{filter_name}")
        rows.append(
            Row(
                task=task,
                metric=key,
                value=value * scale,
                stderr=stderr * scale if _is_number(stderr) else None,
                shots=shots if isinstance(shots, int) else None,
                **_paper_columns(reference, key, shots),
            )
        )
    return rows


def _paper_columns(reference: suite.PaperReference | None, key: str, shots) -> dict:
    if reference is None or key != reference.metric:
        return {}
    notes = [] if reference.comparable else [f"not comparable: {reference.differences}"]
    if reference.comparable and reference.shots is not None and isinstance(shots, int) and shots != reference.shots:
        notes.append(f"{shots}-shot here, {reference.shots}-shot in the paper")
    if reference.value is None:
        notes.append(f"the paper reports no {reference.name} number for this model")
    return {"paper": reference.value, "paper_shots": reference.shots, "note": "; ".join(notes)}


def _aggregated_subtasks(results: dict) -> set[str]:
    """Subtasks (at any depth) of groups that report their own aggregate metrics."""
    groups = results.get("group_subtasks", {})
    scores = results.get("results", {})
    hidden: set[str] = set()
    for group, members in groups.items():
        if _has_metrics(scores.get(group, {})):
            hidden |= _descendants(group, groups)
    return hidden


def _descendants(group: str, groups: dict) -> set[str]:
    found: set[str] = set()
    for member in groups.get(group, []):
        found.add(member)
        found |= _descendants(member, groups)
    return found


def _has_metrics(metrics: dict) -> bool:
    return any("," in key and _is_number(value) for key, value in metrics.items())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _default_scale(metric: str) -> float:
    return 100.0 if metric in PERCENT_METRICS else 1.0


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _fmt_int(value: int | None) -> str:
    return "" if value is None else str(value)


def markdown_table(results: dict, paper_model: str | None = None) -> str:
    """The results as a markdown table: task, metric, value, stderr, shots, the paper's value and shots, notes."""
    paper_model = paper_model or paper_model_for(results)
    label = suite.paper_numbers()["models"][suite.paper_numbers()["paper_models"][paper_model]]
    lines = [
        f"| Task | Metric | Value | Stderr | Shots | Paper ({label}) | Paper shots | Note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in result_rows(results, paper_model):
        cells = [row.task, row.metric, _fmt(row.value), _fmt(row.stderr), _fmt_int(row.shots), _fmt(row.paper),
                 _fmt_int(row.paper_shots), row.note.replace("|", "/")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(results: dict, paper_model: str | None = None, heading: bool = True) -> str:
    """What was evaluated and how, and :func:`markdown_table`; under an ``## Evaluation`` heading if ``heading``."""
    config = results.get("config", {})
    lines = ["## Evaluation (lm-evaluation-harness)", ""] if heading else []
    lines.append(f"- Model: {_describe_model(config)}")
    lines.append(f"- lm-eval {results.get('lm_eval_version', '?')}, {_date(results)}")
    if config.get("limit") is not None:
        lines.append(f"- **limit={config['limit']}**: a partial run, not comparable with the paper")
    lines += [
        "- Accuracy-type metrics in percent, as in the paper; the paper's numbers come from DeepSeek's internal "
        "framework (arXiv 2401.06066), so treat them as anchors, not targets.",
        "",
        markdown_table(results, paper_model),
    ]
    return "\n".join(lines)


def _describe_model(config: dict) -> str:
    args = config.get("model_args")
    if isinstance(args, dict):
        args = ", ".join(f"{key}={value}" for key, value in args.items())
    return f"`{config.get('model', '?')}` ({args})" if args else f"`{config.get('model', '?')}`"


def _date(results: dict) -> str:
    import datetime

    stamp = results.get("date")
    return datetime.datetime.fromtimestamp(stamp).isoformat(timespec="seconds") if _is_number(stamp) else ""


def latest_results_file(output_path: str | os.PathLike, since: float = 0.0) -> Path | None:
    """The newest lm-eval results JSON written under ``output_path`` since ``since`` (a ``time.time()`` value).

    lm-eval writes ``<output_path>/<model>/results_<date>.json``, or ``<stem>_<date>.json`` beside it when
    ``output_path`` ends in ``.json``.
    """
    path = Path(output_path)
    root = path.parent if path.suffix == ".json" else path
    pattern = f"{path.stem}_*.json" if path.suffix == ".json" else "results_*.json"
    candidates = [file for file in root.rglob(pattern) if file.stat().st_mtime >= since - 1]
    return max(candidates, key=lambda file: file.stat().st_mtime) if candidates else None


def write_markdown_beside(results_file: Path | None, markdown: str) -> Path | None:
    """Write ``markdown`` next to lm-eval's results JSON (same name, ``.md``)."""
    if results_file is None:
        return None
    target = results_file.with_suffix(".md")
    target.write_text(markdown, encoding="utf-8")
    return target


def card_directory(model_args: dict) -> Path:
    """The checkpoint a model card belongs to: the adapter's directory if there is one, else ``pretrained``."""
    location = (model_args.get("adapter") or model_args.get("esft") or model_args.get("peft")
                or model_args.get("pretrained"))  # fmt: skip
    path = Path(str(location))
    if not path.is_dir():
        raise FileNotFoundError(f"Cannot write a model card: {location} is not a local checkpoint directory.")
    return path


def write_model_card(model_dir: str | os.PathLike, results: dict, paper_model: str | None = None) -> Path:
    """Put the results into the Evaluation section of ``model_dir/README.md`` (the project's model card), replacing
    an earlier one; a directory without a card gets a minimal one."""
    from deepseekmoe.model_cards.card import set_eval_table

    return set_eval_table(model_dir, markdown_report(results, paper_model, heading=False))
