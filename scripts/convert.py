"""Checking a downloaded released checkpoint and rewriting it (dtype, shard size, safetensors from .bin) in the
released layout, into a new directory: the source is never modified."""

import shutil
from pathlib import Path

from transformers import AutoModelForCausalLM

from modeling_deepseekmoe import DeepseekMoEConfig
from modeling_deepseekmoe.checkpoint import checkpoint_tensor_files, released_tensor_shapes, validate_checkpoint

from .inference import DTYPES


# Files besides the weights that travel with a checkpoint.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json", "README.md", "LICENSE", "LICENSE-MODEL",
)  # fmt: skip


def check_checkpoint(path: str | Path) -> dict:
    """Validate a checkpoint directory against its config.json (every shard and tensor present, shapes consistent);
    returns a summary, raises `CheckpointError` / `ValueError` naming what is wrong."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a checkpoint directory.")
    config = DeepseekMoEConfig.from_pretrained(path)
    validate_checkpoint(path, config)
    files = checkpoint_tensor_files(path)
    shapes = released_tensor_shapes(config, with_lm_head="lm_head.weight" in files)
    return {
        "path": str(path),
        "tensors": len(files),
        "shards": len(set(files.values())),
        "parameters": sum(_numel(shape) for shape in shapes.values()),
        "format": "safetensors" if next(iter(files.values())).endswith(".safetensors") else "bin",
    }


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def convert_checkpoint(source: str | Path, destination: str | Path, dtype: str = "auto",
                       max_shard_size: str = "5GB") -> dict:
    """Check `source`, then write it to `destination` in the released layout (safetensors, the given dtype and shard
    size) with its tokenizer and side files. Refuses to write into the source."""
    source, destination = Path(source).resolve(), Path(destination).resolve()
    if destination == source or source in destination.parents:
        raise ValueError(f"The destination {destination} is inside the source checkpoint; choose another directory.")
    if destination.exists() and any(destination.iterdir()):
        raise ValueError(f"The destination {destination} is not empty; choose a new directory.")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    check_checkpoint(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    model.save_pretrained(destination, max_shard_size=max_shard_size)
    for name in SIDE_FILES:
        if (source / name).is_file() and not (destination / name).exists():
            shutil.copy2(source / name, destination / name)
    return check_checkpoint(destination)
