"""Base + ESFT adapter -> one full checkpoint in the released layout."""

import os
from pathlib import Path

from transformers import AutoTokenizer

from ..adapters import ESFT, adapter_kind, load_model
from ..merge import _tokenizer_source, check_output_dir, merge_inputs, write_checkpoint


def merge_esft_adapter(
    base_model_name_or_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    if adapter_kind(adapter_dir) != ESFT:
        raise ValueError(f"{adapter_dir} is a LoRA adapter, not an ESFT one: merge it with `deepseekmoe merge`.")
    check_output_dir(output_dir, overwrite, merge_inputs(base_model_name_or_path, adapter_dir))
    model = load_model(base_model_name_or_path, adapter_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(adapter_dir, base_model_name_or_path))
    return write_checkpoint(model, tokenizer, output_dir, max_shard_size, overwrite,
                            inputs=merge_inputs(base_model_name_or_path, adapter_dir), adapter_dir=adapter_dir)
