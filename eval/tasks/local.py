"""Offline datasets for the project's lm-eval task configs, and the few prompt helpers Jinja cannot express.

lm-eval resolves a relative ``data_files`` entry against the current directory, not the YAML. The task configs here
therefore load their data through ``custom_dataset``, which lm-eval calls with the task's ``dataset_kwargs`` and the
run's metadata (``--metadata`` on the command line):

- :func:`load_shipped` reads files shipped in ``tasks/data/`` (the tiny tasks);
- :func:`load_user_files` reads files the user supplies for benchmarks lm-eval lacks, from ``data_dir`` (metadata
  key) or the ``DEEPSEEKMOE_EVAL_DATA`` environment variable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import DATA_DIR, SAMPLES_DIR

DATA_DIR_ENV = "DEEPSEEKMOE_EVAL_DATA"
"""Environment variable naming the directory that holds the user's local benchmark files."""

IDIOM_BLANK = "#idiom#"


class LocalDataError(FileNotFoundError):
    """A local task's data file is missing or unreadable; the message says where it was looked for."""


def read_rows(path: Path) -> list[dict]:
    """Rows of a ``.jsonl`` file (one JSON object a line) or a ``.json`` file holding a list of objects."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
        raise LocalDataError(f"{path} holds no rows: expected JSON objects, one per line (.jsonl) or a JSON list.")
    return rows


def _dataset_dict(files: dict[str, Path]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_rows(path)) for split, path in files.items()})


def _check_data_files(data_files) -> dict[str, str]:
    if not isinstance(data_files, dict) or not data_files:
        raise ValueError(f"dataset_kwargs.data_files must map split names to file names, got {data_files!r}.")
    return data_files


def _resolve(data_files: dict[str, str], root: Path | None) -> dict[str, Path]:
    return {split: Path(name) if Path(name).is_absolute() else root / name for split, name in data_files.items()}


def load_shipped(data_files: dict[str, str], **_metadata):
    """The splits of a shipped task, read from ``tasks/data/``."""
    files = _resolve(_check_data_files(data_files), DATA_DIR)
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise LocalDataError(f"Shipped task data is missing: {', '.join(missing)} (a broken install of deepseekmoe?).")
    return _dataset_dict(files)


def user_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the user's local benchmark files are: ``data_dir`` if given, else ``$DEEPSEEKMOE_EVAL_DATA``."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def load_user_files(data_files: dict[str, str], data_dir: str | os.PathLike | None = None, **_metadata):
    """The splits of a local benchmark, read from the user's data directory.

    ``data_files`` names files relative to the data directory (absolute paths are used as they are). A missing
    directory or file raises :class:`LocalDataError` naming the file, where it was looked for, how to point elsewhere,
    and a sample file in the expected format.
    """
    data_files = _check_data_files(data_files)
    root = user_data_dir(data_dir)
    if root is None and not all(Path(name).is_absolute() for name in data_files.values()):
        raise LocalDataError(
            f"This local task reads user-supplied files ({', '.join(data_files.values())}) and no data directory is "
            f"set: pass --metadata data_dir=DIR (deepseekmoe eval --data_dir DIR; data_dir=... in the Python API) or "
            f"set {DATA_DIR_ENV}. The expected format is shown in {SAMPLES_DIR}."
        )
    files = _resolve(data_files, root)
    for split, path in files.items():
        if not path.is_file():
            sample = SAMPLES_DIR / data_files[split]
            hint = f" A sample in the expected format: {sample}." if sample.is_file() else ""
            raise LocalDataError(
                f"Local benchmark file not found: {path} (split {split!r}, data directory {root}).{hint}"
            )
    return _dataset_dict(files)


def chid_doc_to_text(doc: dict) -> str:
    """The CHID passage up to the idiom blank (FewCLUE format: ``content`` with one ``#idiom#``)."""
    return _split_chid(doc)[0]


def chid_doc_to_choice(doc: dict) -> list[str]:
    """Each candidate idiom followed by the rest of the passage, so the whole completed sentence is scored."""
    rest = _split_chid(doc)[1].replace(IDIOM_BLANK, "")
    return [candidate + rest for candidate in doc["candidates"]]


def _split_chid(doc: dict) -> tuple[str, str]:
    content = doc["content"]
    if IDIOM_BLANK not in content:
        raise ValueError(f"CHID row {doc.get('id')!r} has no {IDIOM_BLANK} blank in its content.")
    before, after = content.split(IDIOM_BLANK, 1)
    return before, after
