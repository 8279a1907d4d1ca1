"""Checking a downloaded released checkpoint and rewriting it (dtype, shard size, safetensors from .bin) in the
released layout, into a new directory: the source is never modified, and the copy is written whole or not at all
(`modeling_deepseekmoe.checkpoint_writer`: staged, validated, renamed)."""

from pathlib import Path

from transformers import AutoModelForCausalLM

from modeling_deepseekmoe import DeepseekMoEConfig, checkpoint_writer
from modeling_deepseekmoe.checkpoint import checkpoint_tensor_files, released_tensor_shapes, validate_checkpoint

from modeling_deepseekmoe.loading import resolve_dtype


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
                       max_shard_size: str | int = "5GB", overwrite: bool = False) -> dict:
    """Check `source`, then write it to `destination` in the released layout (safetensors, the given dtype and shard
    size) with its tokenizer and side files. Refuses to write into or over the source; replaces a non-empty
    `destination` only with `overwrite`."""
    source, destination = Path(source), Path(destination)
    checkpoint_writer.check_output_dir(destination, overwrite, {"source checkpoint": source}, nesting=False)
    torch_dtype = resolve_dtype(dtype)
    checkpoint_writer.parse_shard_size(max_shard_size)
    check_checkpoint(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    side_files = {name: source / name for name in SIDE_FILES if (source / name).is_file()}
    card = None
    if "README.md" not in side_files:  # the source's own card travels with it; without one, say where this came from
        from deepseekmoe.model_cards.card import write_base_card

        origin = (f"Converted from `{source.absolute()}` by `deepseekmoe convert` (dtype {dtype}, shards of at most "
                  f"{max_shard_size}).")
        location = str(destination.absolute())
        card = lambda staging: write_base_card(staging, model.config, origin=origin, location=location)  # noqa: E731
    checkpoint_writer.save_checkpoint(model, destination, max_shard_size=max_shard_size, overwrite=overwrite,
                                      inputs={"source checkpoint": source}, nesting=False, side_files=side_files,
                                      finalize=card)
    return check_checkpoint(destination)
