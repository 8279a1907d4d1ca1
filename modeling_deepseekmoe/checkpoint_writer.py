"""Writing outputs whole or not at all: the one writer of checkpoints and output folders.

Every output (a merged or converted checkpoint, the final model of a training run, a training checkpoint) is written
into a hidden staging folder beside its destination, checked, given the permissions of a normally created folder
(files 0666 and folders 0777 less the umask: safetensors writes its files 0600 through a temporary file) and only then
renamed into place. An interruption or a full disk leaves the destination as it was, plus at most a hidden
`.NAME.staging` folder that the next write to the same destination removes; a full disk is reported as
`DiskFullError` ("disk full at PATH").

    with staged_output("merged", overwrite=True, inputs={"base model": base}) as staging:
        model.save_pretrained(staging)

Outputs never overwrite inputs: `check_output_dir` refuses an output folder that is one of the command's inputs (or,
when it is to be replaced, holds one).
"""

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .checkpoint import CheckpointError, validate_checkpoint


STAGING_SUFFIX = ".staging"
REPLACED_SUFFIX = ".replaced"
# Files whose presence says "this folder holds a complete model / adapter"; moved in last, removed first.
COMPLETION_MARKERS = ("config.json", "adapter_config.json", "esft_adapter.json")
# A failed write on a filesystem with less than this left is a full disk even when the error does not say so
# (torch.save reports it as "unexpected pos ..."). The margin also covers the blocks reserved for root.
LOW_SPACE_BYTES = 1 << 20
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
# {what the input is ("base model", "adapter", ...): its path}; paths that do not exist locally (hub ids) are skipped.
Inputs = Mapping[str, str | os.PathLike | None] | None
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


class DiskFullError(OSError):
    """The disk filled up while an output was written; nothing was left that looks complete."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        super().__init__(errno.ENOSPC, self.message, self.path)

    @property
    def message(self) -> str:
        return (f"disk full at {self.path}: the output was not saved (no partial copy is left); free some space "
                "or choose an output on another disk, then run again")

    def __str__(self) -> str:
        return self.message


def is_disk_full(error: BaseException, directory: str | os.PathLike | None = None) -> bool:
    """Whether `error` (or an error it was raised from) is a full disk or quota, by errno, by the message
    safetensors gives it, or by the space left in `directory` after the failure."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error).lower() for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return directory is not None and free_bytes(directory) < LOW_SPACE_BYTES


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged user can still write on the filesystem of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


@contextmanager
def reporting_disk_full(destination: str | os.PathLike, space_check: str | os.PathLike | None = None):
    """Turn a full-disk failure inside the block into `DiskFullError(destination)`; other errors pass unchanged.
    `space_check` is a folder on the written filesystem, consulted when the error itself does not say why."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err, space_check):
            raise DiskFullError(destination) from err
        raise


def parse_shard_size(value: str | int) -> int:
    """`--max_shard_size` in bytes ("5GB", "500MB", "2GiB" or a number of bytes); a ValueError naming the value if it
    is not a positive size, raised before anything is written."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError(f"--max_shard_size {value!r} is not a size: use e.g. 5GB, 500MB or a number of bytes.")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise ValueError(f"--max_shard_size must be positive, got {value!r}: use e.g. 5GB or 500MB.")
    return size


# --------------------------------------------------------------------------------------------------------------------
# Outputs and inputs


def _local(path: str | os.PathLike | None) -> Path | None:
    if path is None or not Path(path).exists():
        return None  # a hub id, or nothing: it cannot be overwritten here
    return Path(path).resolve()


def check_not_an_input(
    output: str | os.PathLike, inputs: Inputs, *, replacing: bool = False,
    nesting: bool = True,
) -> None:
    """Refuse an output that is one of `inputs` ({what it is: path}); with `replacing` (the output folder is deleted
    or replaced) also one that holds an input, and with `nesting=False` one inside an input folder."""
    target = Path(output).resolve()
    for label, path in (inputs or {}).items():
        source = _local(path)
        if source is None:
            continue
        if source == target:
            raise ValueError(f"The output {output} is the {label} ({path}); writing there would destroy it. "
                             "Choose another output directory.")
        if replacing and target in source.parents:
            raise ValueError(f"The output {output} holds the {label} ({path}), which replacing it would delete. "
                             "Choose another output directory.")
        if not nesting and source in target.parents:
            raise ValueError(f"The output {output} is inside the {label} ({path}), which must stay unmodified. "
                             "Choose a directory outside it.")


def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, inputs: Inputs = None,
    *, nesting: bool = True, overwrite_flag: str = "--overwrite",
) -> Path:
    """The output folder of a command, refused when it is (or would delete) an input, is a file, or is not empty
    without `overwrite`."""
    output_dir = Path(output_dir)
    check_not_an_input(output_dir, inputs, replacing=overwrite, nesting=nesting)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"The output {output_dir} exists and is not a directory; choose another path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"The output {output_dir} exists and is not empty; pass {overwrite_flag} to replace it "
                              "or choose another directory.")
    return output_dir


# --------------------------------------------------------------------------------------------------------------------
# Staging and committing


def staging_dir(destination: str | os.PathLike) -> Path:
    destination = Path(destination).absolute()
    return destination.parent / f".{destination.name}{STAGING_SUFFIX}"


def prepare_staging(destination: str | os.PathLike, staging: str | os.PathLike | None = None) -> Path:
    """An empty staging folder for `destination` (by default `.NAME.staging` beside it; what an interrupted write
    left there is removed first)."""
    staging = Path(staging) if staging is not None else staging_dir(destination)
    if staging.exists():
        shutil.rmtree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    return staging


def normalize_permissions(directory: str | os.PathLike) -> None:
    """Give every file under `directory` 0666 and every folder 0777, less the umask (read from the mode a folder
    created now gets, so no process-wide umask change is needed)."""
    directory = Path(directory)
    probe = directory / ".permissions-probe"
    probe.mkdir()
    folder_mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    file_mode = folder_mode & 0o666
    for root, folders, files in os.walk(directory):
        os.chmod(root, folder_mode)
        for names, mode in ((folders, folder_mode), (files, file_mode)):
            for name in names:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, mode)


def remove_directory(path: str | os.PathLike) -> None:
    """Delete a folder so that an interruption never leaves a half-deleted one under its name: it is renamed to a
    hidden name first (the checkpoint rotation of training runs needs exactly this)."""
    path = Path(path)
    if not path.exists():
        return
    hidden = path.parent / f".{path.name}{REPLACED_SUFFIX}"
    if hidden.exists():
        shutil.rmtree(hidden)
    os.replace(path, hidden)
    shutil.rmtree(hidden)


def _replace_entry(source: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        remove_directory(target)
    os.replace(source, target)


def commit_staging(
    staging: str | os.PathLike, destination: str | os.PathLike, *, validate: Callable[[Path], None] | None = None,
    into: bool = False,
) -> Path:
    """Check the staged output (`validate(staging)` raises if it is not complete), normalize its permissions and
    rename it into place. By default it replaces `destination` whole; with `into=True` its entries are moved into the
    existing folder `destination` (a run folder that also holds checkpoints), the completion markers last."""
    staging, destination = Path(staging), Path(destination)
    if validate is not None:
        validate(staging)
    normalize_permissions(staging)
    if not into:
        if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
            remove_directory(destination)
        os.replace(staging, destination)
        return destination
    destination.mkdir(parents=True, exist_ok=True)
    entries = sorted(staging.iterdir(), key=lambda path: path.name in COMPLETION_MARKERS)
    for marker in entries:
        if marker.name in COMPLETION_MARKERS:
            (destination / marker.name).unlink(missing_ok=True)  # the old output stops looking complete first
    for entry in entries:
        _replace_entry(entry, destination / entry.name)
    staging.rmdir()
    return destination


def discard_staging(staging: str | os.PathLike) -> None:
    shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_output(
    destination: str | os.PathLike, *, overwrite: bool = False, inputs: Inputs = None,
    nesting: bool = True, validate: Callable[[Path], None] | None = None, overwrite_flag: str = "--overwrite",
) -> Iterator[Path]:
    """Yield a staging folder; when the block succeeds, validate it and rename it to `destination` (replacing it
    only with `overwrite`). On any failure the staging folder is removed and the destination is untouched."""
    destination = check_output_dir(destination, overwrite, inputs, nesting=nesting, overwrite_flag=overwrite_flag)
    destination = destination.absolute()
    staging = prepare_staging(destination)
    try:
        with reporting_disk_full(destination, staging):
            yield staging
            commit_staging(staging, destination, validate=validate)
    finally:
        discard_staging(staging)


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write one file through `write(temporary_path)` beside it, then rename: readers see the old file or the new
    one, never a part."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with reporting_disk_full(path, path.parent):
            write(temporary)
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_json_atomically(path: str | os.PathLike, data) -> Path:
    return write_file_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"))


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def check_weight_files(directory: str | os.PathLike) -> None:
    """Every safetensors file under `directory` opens (its header is complete and matches the file size)."""
    for path in sorted(Path(directory).rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as err:
            raise CheckpointError(f"{path} was not written completely ({err}).") from err


def validate_saved_model(directory: str | os.PathLike, config=None) -> None:
    """A saved model folder is complete: the released layout against `config` when it holds a full DeepSeekMoE
    (config.json), else every weight file readable (an adapter)."""
    directory = Path(directory)
    if config is not None and config.model_type == "deepseek" and (directory / "config.json").is_file():
        validate_checkpoint(directory, config)
    else:
        check_weight_files(directory)


def save_checkpoint(
    model, destination: str | os.PathLike, *, tokenizer=None, max_shard_size: str | int = "5GB",
    overwrite: bool = False, inputs: Inputs = None, nesting: bool = True,
    side_files: Mapping[str, str | os.PathLike] | None = None, finalize: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` (released layout) with its tokenizer, copies of `side_files` ({name: source path}) and whatever
    `finalize(staging)` adds (a model card) to `destination`, whole or not at all, validated against the model's
    config."""
    parse_shard_size(max_shard_size)
    with staged_output(destination, overwrite=overwrite, inputs=inputs, nesting=nesting,
                       validate=lambda staging: validate_checkpoint(staging, model.config)) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, source in (side_files or {}).items():
            if not (staging / name).exists():
                shutil.copy2(source, staging / name)
        if finalize is not None:
            finalize(staging)
    return Path(destination)
