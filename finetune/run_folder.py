"""Which run owns an output folder, and what a new run may do with it.

A run records itself in `sft_run.json` when it starts (the model, the data, the method flags: its identity) and marks
itself finished there after the final save. A later run into the same folder then
- starts, when the folder holds no checkpoint and no model;
- resumes, with `--resume_from_checkpoint true`, only a run of the same identity, and is a no-op with a message when
  that run has finished and the new `--max_steps` / `--num_train_epochs` would not train further;
- is refused otherwise (another run's checkpoints, a finished run, a model of unknown origin), unless
  `--overwrite_output_dir` deletes the earlier run's outputs first (never the new run's inputs).
"""

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from modeling_deepseekmoe import checkpoint_writer


logger = logging.getLogger(__name__)

RUN_INFO_FILE = "sft_run.json"
FINAL_STAGING_DIR = ".staging-final"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
LATEST = ("true", "last", "auto", "latest")
NO_RESUME = ("false", "no", "none", "")
# What a final save writes (a full model, a LoRA or ESFT adapter, the tokenizer), and the run's own records.
FINAL_OUTPUT_PATTERNS = (
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.*", "adapter_config.json",
    "esft_adapter.json", "expert_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "training_args.bin", "user_content.pt",
)  # fmt: skip
RUN_RECORDS = (RUN_INFO_FILE, "run_summary.json", "loss_curve.png", "README.md", "expert_load", "runs", ".staging",
               FINAL_STAGING_DIR)  # fmt: skip
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin", "adapter_model.*")
# ModelArguments / DataArguments fields that make a run this run: the model, the data, the method.
IDENTITY_MODEL_FIELDS = (
    "model_name_or_path", "tokenizer_name_or_path", "use_peft", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "lora_layers", "lora_modules_to_save", "use_rslora", "load_in_4bit", "load_in_8bit",
    "bnb_4bit_quant_type", "use_bnb_nested_quant", "train_router",
)  # fmt: skip
IDENTITY_DATA_FIELDS = ("dataset_name", "dataset_train_split", "eval_dataset_name", "dataset_format")
FRESH_START = "choose another --output_dir, or pass --overwrite_output_dir true to delete what is there and start over"


def _local_path(value):
    return os.path.abspath(value) if isinstance(value, str) and os.path.exists(value) else value


def _json_safe(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_identity(model_args, data_args, method: dict | None = None) -> dict:
    """The model, data and method of a run (local paths made absolute), as compared between runs. `method` adds
    what the caller trains beyond the flags (e.g. ESFT's trainer and expert selection)."""
    identity = {name: _local_path(getattr(model_args, name)) for name in IDENTITY_MODEL_FIELDS}
    identity.update({name: _local_path(getattr(data_args, name)) for name in IDENTITY_DATA_FIELDS})
    identity["method"] = method or {}
    return _json_safe(identity)


def _differences(recorded: dict, current: dict, limit: int = 3) -> str:
    keys = sorted(set(recorded) | set(current), key=lambda key: (key == "method", key))
    changed = [f"{key} {recorded.get(key)!r} there, {current.get(key)!r} now"
               for key in keys if recorded.get(key) != current.get(key)]  # fmt: skip
    return "; ".join(changed[:limit]) + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


@dataclass
class RunFolder:
    path: Path
    info: dict | None
    checkpoints: list[Path]  # by step
    final_output: list[str]  # weight files of a final model or adapter

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RunFolder":
        path = Path(path)
        if not path.is_dir():
            return cls(path, None, [], [])
        info_path = path / RUN_INFO_FILE
        try:
            info = json.loads(info_path.read_text()) if info_path.is_file() else None
        except json.JSONDecodeError:
            info = {}  # unreadable: a run of unknown identity
        checkpoints = sorted(
            (entry for entry in path.iterdir() if entry.is_dir() and CHECKPOINT_NAME.match(entry.name)),
            key=lambda entry: int(CHECKPOINT_NAME.match(entry.name).group(1)),
        )
        final = sorted({entry.name for pattern in WEIGHT_PATTERNS for entry in path.glob(pattern) if entry.is_file()})
        return cls(path, info, checkpoints, final)

    @property
    def occupied(self) -> bool:
        return bool(self.checkpoints or self.final_output)

    @property
    def finished(self) -> bool:
        return bool(self.info) and self.info.get("status") == "finished"

    @property
    def identity(self) -> dict | None:
        return (self.info or {}).get("identity")

    def describe(self) -> str:
        parts = []
        if self.checkpoints:
            parts.append(f"{len(self.checkpoints)} checkpoint(s) (latest {self.checkpoints[-1].name})")
        if self.final_output:
            parts.append(f"a final model ({', '.join(self.final_output[:2])})")
        return " and ".join(parts)


def _trains_further(info: dict, max_steps: int, num_train_epochs: float) -> bool:
    done = info.get("global_step")
    if done is None:
        return False
    if max_steps > 0:
        return max_steps > done
    return info.get("max_steps", -1) <= 0 and num_train_epochs > info.get("num_train_epochs", 0)


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


@dataclass
class RunPlan:
    """What a run does with its output folder: resume from `checkpoint` (or start), first deleting the earlier run's
    outputs when `clear`; or nothing, when `skip` says why."""

    checkpoint: str | None = None
    clear: bool = False
    skip: str | None = None


def plan_run(
    output_dir: str | os.PathLike, identity: dict, *, resume_from_checkpoint=None, overwrite_output_dir: bool = False,
    max_steps: int = -1, num_train_epochs: float = 3.0, inputs: checkpoint_writer.Inputs = None,
) -> RunPlan:
    """Decide, before anything is loaded or written, whether this run may use `output_dir` (see the module doc).
    Raises ValueError / FileNotFoundError with the fix when it may not."""
    checkpoint_writer.check_not_an_input(output_dir, inputs)
    folder = RunFolder.read(output_dir)
    where = folder.path
    value = resume_from_checkpoint
    latest = value is not None and str(value).lower() in LATEST
    explicit = None if value is None or latest or str(value).lower() in NO_RESUME else Path(value)
    if explicit is not None and not explicit.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint directory.")

    if overwrite_output_dir:
        if latest:
            raise ValueError(f"--resume_from_checkpoint {value} and --overwrite_output_dir contradict each other: "
                             f"resume the run in {where}, or delete it and start over, not both.")
        if explicit is not None and _inside(explicit, where):
            raise ValueError(f"--overwrite_output_dir would delete {explicit}, the checkpoint to resume from; "
                             "drop one of the two flags.")
        return RunPlan(str(explicit) if explicit else None, clear=folder.occupied or folder.info is not None)

    same_run = folder.identity == identity
    if explicit is not None and _inside(explicit, where):
        if not same_run:
            logger.warning("Resuming %s, which %s; continuing as asked.", explicit,
                           "another run wrote" if folder.info else "no recorded run wrote")
        if folder.finished and not _trains_further(folder.info, max_steps, num_train_epochs):
            return RunPlan(skip=_finished_message(folder))
        return RunPlan(str(explicit))
    if not folder.occupied:
        if latest:
            logger.warning("No checkpoint in %s to resume from; starting from scratch.", where)
        return RunPlan(str(explicit) if explicit else None)

    if not latest:
        raise ValueError(_refusal(folder, same_run, identity, explicit))
    if not folder.info:
        raise ValueError(
            f"--resume_from_checkpoint true would resume a run of unknown origin: {where} holds "
            f"{folder.describe()} but no {RUN_INFO_FILE} saying which run wrote them. Pass the checkpoint itself "
            f"(--resume_from_checkpoint {where}/checkpoint-N) to resume it anyway, or {FRESH_START}."
        )
    if not same_run:
        raise ValueError(
            f"--resume_from_checkpoint true would resume another run: {where} holds {folder.describe()} of a run "
            f"with other settings ({_differences(folder.identity or {}, identity)}). Resume it with its own flags, "
            f"or {FRESH_START}."
        )
    if folder.finished and not _trains_further(folder.info, max_steps, num_train_epochs):
        return RunPlan(skip=_finished_message(folder))
    if not folder.checkpoints:
        raise ValueError(
            f"The run in {where} has no checkpoint to continue from (it was saved with --save_strategy no); "
            f"{FRESH_START}."
        )
    return RunPlan(str(folder.checkpoints[-1]))


def _finished_message(folder: RunFolder) -> str:
    return (
        f"The run in {folder.path} already finished at step {folder.info.get('global_step')} and its final model is "
        "saved there; nothing to resume. Raise --max_steps (or --num_train_epochs) to train it further, or pass "
        "--overwrite_output_dir true to start over."
    )


def _refusal(folder: RunFolder, same_run: bool, identity: dict, explicit: Path | None) -> str:
    where, holds = folder.path, folder.describe()
    if explicit is not None:
        return (f"{where} holds {holds} of an earlier run; resuming {explicit} there would mix the two runs: "
                f"{FRESH_START}.")
    if not folder.info:
        return f"{where} holds {holds} of another run (no {RUN_INFO_FILE} says which): {FRESH_START}."
    if not same_run:
        return (f"{where} holds {holds} of another run ({_differences(folder.identity or {}, identity)}): "
                f"{FRESH_START}.")
    if folder.finished:
        return (f"{where} holds this run, finished at step {folder.info.get('global_step')}: pass "
                "--resume_from_checkpoint true with a larger --max_steps to train it further, or "
                f"{FRESH_START}.")
    return (f"{where} holds this run, unfinished ({holds}): pass --resume_from_checkpoint true to continue it, or "
            f"{FRESH_START}.")


def clear_run_outputs(output_dir: str | os.PathLike, inputs: checkpoint_writer.Inputs = None) -> list[str]:
    """Delete what an earlier run wrote to `output_dir` (checkpoints, final model, records), never one of `inputs`
    nor a folder holding one; other files stay. Returns the names deleted."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    protected = [Path(path).resolve() for path in (inputs or {}).values() if path and os.path.exists(path)]
    entries = {entry for entry in folder.iterdir() if entry.is_dir() and CHECKPOINT_NAME.match(entry.name)}
    entries |= {entry for pattern in FINAL_OUTPUT_PATTERNS + RUN_RECORDS for entry in folder.glob(pattern)}
    removed = []
    for entry in sorted(entries):
        resolved = entry.resolve()
        if any(resolved == path or resolved in path.parents for path in protected):
            continue
        if entry.is_dir() and not entry.is_symlink():
            checkpoint_writer.remove_directory(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def _model_reference(path):
    from modeling_deepseekmoe.loading import model_reference

    try:
        return model_reference(path)
    except FileNotFoundError:
        return path


def write_run_info(output_dir: str | os.PathLike, model_args, data_args, identity: dict) -> dict:
    """Record the run at its start: what `merge` needs (the base, its quantization) and the identity later runs are
    checked against. A resumed run keeps its start time."""
    path = Path(output_dir) / RUN_INFO_FILE
    previous = RunFolder.read(output_dir).info or {}
    info = {
        "base_model_name_or_path": _model_reference(model_args.model_name_or_path),
        "quantization": model_args.quantization,
        "use_peft": model_args.use_peft,
        "model_args": _json_safe(asdict(model_args)),
        "data_args": _json_safe(asdict(data_args)),
        "identity": identity,
        "status": "running",
        "started": previous.get("started") if previous.get("identity") == identity else None,
    }
    info["started"] = info["started"] or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_writer.write_json_atomically(path, info)
    return info


def mark_run_finished(output_dir: str | os.PathLike, global_step: int, max_steps: int, num_train_epochs: float):
    """After the final save: the run is finished at `global_step` (what resuming it compares against)."""
    path = Path(output_dir) / RUN_INFO_FILE
    info = RunFolder.read(output_dir).info or {}
    info.update(status="finished", global_step=global_step, max_steps=max_steps, num_train_epochs=num_train_epochs,
                finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    checkpoint_writer.write_json_atomically(path, info)
