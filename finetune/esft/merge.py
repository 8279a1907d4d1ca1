"""Base + ESFT adapter -> one full checkpoint in the released layout."""

import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from deepseekmoe.inference import DTYPES

from ..merge import _tokenizer_source, check_output_dir, write_checkpoint
from .adapter import apply_esft_adapter


def merge_esft_adapter(
    base_model_name_or_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    check_output_dir(output_dir, overwrite)
    model = AutoModelForCausalLM.from_pretrained(base_model_name_or_path, dtype=DTYPES[dtype])
    apply_esft_adapter(model, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(adapter_dir, base_model_name_or_path))
    card = {"base_model": str(base_model_name_or_path), "method": f"ESFT adapter {adapter_dir} merged"}
    return write_checkpoint(model, tokenizer, output_dir, max_shard_size, overwrite, card)
