"""The paper's benchmark suite: published numbers, the benchmark -> lm-eval task mapping, and task lookup.

The suite itself is a set of lm-eval groups shipped in ``tasks/paper/`` (``paper_base``, ``paper_chat`` and their
``*_local`` halves); :func:`build_task_manager` makes them (and the tiny offline tasks) visible to lm-eval.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .tasks import PAPER_DIR, TASKS_DIR

PAPER_NUMBERS_FILE = Path(__file__).resolve().parent / "paper_numbers.json"
MAPPING_FILE = PAPER_DIR / "mapping.json"

PAPER_GROUPS = ("paper_base", "paper_base_local", "paper_chat", "paper_chat_local")
TINY_GROUP = "dsmoe_tiny"
PAPER_MODELS = ("base", "chat")


class UnknownTaskError(ValueError):
    """A task name that neither lm-eval nor the project's task directories know."""


@dataclass(frozen=True)
class PaperReference:
    """What the paper reports for the benchmark an lm-eval task implements."""

    task: str
    benchmark: str
    name: str
    metric: str  # the lm-eval result key compared with the paper, e.g. "acc_norm,none"
    scale: float  # multiplies lm-eval's value onto the paper's scale (100 for percentages)
    value: float | None  # the paper's number for the chosen model, None where the paper has none
    shots: int | None
    comparable: bool
    differences: str


@lru_cache(maxsize=1)
def paper_numbers() -> dict:
    """The paper's published table (``paper_numbers.json``)."""
    return json.loads(PAPER_NUMBERS_FILE.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def paper_mapping() -> dict:
    """Benchmark -> lm-eval task mapping (``tasks/paper/mapping.json``)."""
    return json.loads(MAPPING_FILE.read_text(encoding="utf-8"))


def paper_reference(task: str, model: str = "base") -> PaperReference | None:
    """The paper's number for the benchmark ``task`` implements, for the base or chat model; None if unmapped."""
    if model not in PAPER_MODELS:
        raise ValueError(f"paper model must be one of {PAPER_MODELS}, got {model!r}.")
    entry = paper_mapping()["tasks"].get(task)
    if entry is None:
        return None
    numbers = paper_numbers()
    benchmark = numbers["benchmarks"][entry["benchmark"]]
    return PaperReference(
        task=task,
        benchmark=entry["benchmark"],
        name=benchmark["name"],
        metric=entry["metric"],
        scale=entry["scale"],
        value=benchmark["values"][numbers["paper_models"][model]],
        shots=benchmark["shots"][model],
        comparable=entry["comparable"],
        differences=entry["differences"],
    )


def include_paths(include_path: str | os.PathLike | list | tuple | None = None) -> list[str]:
    """The project's task directory followed by the user's include path(s)."""
    if include_path is None:
        extra = []
    elif isinstance(include_path, (list, tuple)):
        extra = [str(path) for path in include_path]
    else:
        extra = [str(include_path)]
    return [str(TASKS_DIR), *extra]


def build_task_manager(tasks: list, include_path=None, metadata: dict | None = None):
    """An lm-eval ``TaskManager`` that knows the project's tasks, the user's include path and lm-eval's own tasks.

    Indexing lm-eval's ~15k built-in task configs takes several seconds, so they are left out when every requested
    task is a name that resolves, group members included, from the project's and the user's directories alone.
    Unknown names raise :class:`UnknownTaskError` with the closest known names.
    """
    from lm_eval.tasks import TaskManager

    paths = include_paths(include_path)
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if not all(isinstance(task, str) and _resolves(manager, task) for task in tasks):
        manager = TaskManager(include_path=paths, metadata=metadata)
    check_task_names(manager, tasks)
    return manager


def check_task_names(manager, tasks: list) -> None:
    """Raise if a task name is unknown to ``manager`` or a task file does not exist."""
    unknown = []
    for task in tasks:
        if not isinstance(task, str):
            continue  # inline configs and Task objects are lm-eval's to validate
        if task.endswith((".yaml", ".yml")):
            if not Path(task).is_file():
                raise FileNotFoundError(f"Task config file not found: {task}")
        elif not manager.match_tasks([task]):
            unknown.append(task)
    if unknown:
        raise UnknownTaskError(_unknown_message(unknown, manager.all_tasks))


def _unknown_message(unknown: list[str], known: list[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3)
        parts.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return (
        f"Unknown task(s): {'; '.join(parts)}. The paper suite is {', '.join(PAPER_GROUPS)}; the tiny offline suite "
        f"is {TINY_GROUP}; `lm-eval ls tasks` lists lm-eval's tasks; pass --include_path for your own task configs."
    )


def _resolves(manager, name: str, accept_tags: bool = False) -> bool:
    """Whether ``name`` and, for a group, all its members are in ``manager``'s index.

    A tag names whichever indexed tasks carry it; with ``accept_tags=False`` it counts as unresolved, since tasks
    outside ``manager``'s directories may carry it too.
    """
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None:
        return False
    if entry.kind is Kind.TAG:
        return accept_tags
    if entry.kind is not Kind.GROUP:
        return True
    return all(_resolves(manager, member, accept_tags) for member in _group_members(entry.cfg or {}))


def _group_members(cfg: dict) -> list[str]:
    members = cfg.get("task", [])
    members = [members] if isinstance(members, str) else members
    return [member["task"] if isinstance(member, dict) else member for member in members]
