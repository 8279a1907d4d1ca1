"""Merge a LoRA / QLoRA adapter into its base and write a plain checkpoint in the released layout.

    merge_adapter("deepseek-moe-16b-chat", "sft-output", "merged")

The result is what the native model, the reference remote code and vLLM load: per-expert safetensors shards + index
(`model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`, expert LoRA merged into them), `config.json` with
`model_type: "deepseek"`, and the tokenizer (the adapter's, which carries the chat template, else the base's).
It is written through the project's one checkpoint writer (`modeling_deepseekmoe.checkpoint_writer`): staged beside
the destination, checked against the released layout, given normal permissions, renamed into place; the output may
not be the base or the adapter (nor, with `overwrite`, a folder holding them).

A QLoRA adapter (trained on a 4-bit / 8-bit base, as recorded in the run's `sft_run.json`) is merged into the
dequantized base weights, the weights it was trained against, unless `quantization="none"` asks for the original
full-precision base.
"""

import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from modeling_deepseekmoe import DeepseekMoEForCausalLM
from modeling_deepseekmoe import checkpoint_writer

from modeling_deepseekmoe.loading import QuantizationArguments

from .adapters import load_model
from .lora import merge_lora


RUN_INFO_FILE = "sft_run.json"  # written by finetune.sft next to the adapter
QUANTIZATIONS = ("auto", "none", "4bit", "8bit")


def adapter_run_info(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / RUN_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _resolve_dtype(dtype: str | torch.dtype | None, base: str | os.PathLike) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        config = json.loads((Path(base) / "config.json").read_text())
        dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return getattr(torch, dtype)


def merged_model(
    base_model_name_or_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = "auto",
    quantization: str = "auto",
):
    """The base with the adapter merged in, as a plain `DeepseekMoEForCausalLM` in `dtype`."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} holds no LoRA adapter (adapter_config.json). The output of a full fine-tuning run is "
            "already a plain checkpoint and needs no merge."
        )
    quantization = resolved_quantization(adapter_dir, quantization)
    torch_dtype = _resolve_dtype(dtype, base_model_name_or_path)
    # The run's quantization flags (quant type, double quant, compute dtype), as it was trained.
    options = QuantizationArguments.from_dict({**_run_model_args(adapter_dir), "load_in_4bit": quantization == "4bit",
                                               "load_in_8bit": quantization == "8bit"})  # fmt: skip
    adapted = load_model(base_model_name_or_path, adapter_dir, dtype=torch_dtype, quantization=options,
                         model_class=DeepseekMoEForCausalLM)  # fmt: skip
    if quantization == "none":
        merged = merge_lora(adapted)
    else:
        from modeling_deepseekmoe.quantization import merge_adapter_into_dequantized_model

        merged = merge_adapter_into_dequantized_model(adapted, dtype=torch_dtype)
    merged.to(torch_dtype)
    merged.config.output_router_logits = False
    merged.config.use_cache = True
    return merged


def _run_model_args(adapter_dir) -> dict:
    return adapter_run_info(adapter_dir).get("model_args", {})


def resolved_quantization(adapter_dir, quantization: str = "auto") -> str:
    """"none", "4bit" or "8bit": `quantization`, or for "auto" what the run recorded."""
    return adapter_run_info(adapter_dir).get("quantization") or "none" if quantization == "auto" else quantization


def merge_adapter(
    base_model_name_or_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    quantization: str = "auto",
    tokenizer_name_or_path: str | os.PathLike | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Merge `adapter_dir` into the base and write the released-layout checkpoint + tokenizer to `output_dir`."""
    inputs = merge_inputs(base_model_name_or_path, adapter_dir, tokenizer_name_or_path)
    check_output_dir(output_dir, overwrite, inputs)
    checkpoint_writer.parse_shard_size(max_shard_size)
    model = merged_model(base_model_name_or_path, adapter_dir, dtype, quantization)
    tokenizer_source = tokenizer_name_or_path or _tokenizer_source(adapter_dir, base_model_name_or_path)
    if quantization == "auto":
        quantization = adapter_run_info(adapter_dir).get("quantization") or "none"
    return write_checkpoint(model, AutoTokenizer.from_pretrained(tokenizer_source), output_dir, max_shard_size,
                            overwrite, inputs=inputs, adapter_dir=adapter_dir, dequantized=quantization != "none")


def merge_inputs(base_model_name_or_path, adapter_dir, tokenizer_name_or_path=None) -> dict:
    """The inputs of a merge, which its output may not overwrite (`check_output_dir`)."""
    return {"base model": base_model_name_or_path, "adapter": adapter_dir, "tokenizer": tokenizer_name_or_path}


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, inputs: checkpoint_writer.Inputs = None) -> Path:
    """Refuse a non-empty output without `overwrite`, and an output that is one of `inputs` or (replaced) holds one."""
    return checkpoint_writer.check_output_dir(output_dir, overwrite, inputs)


def write_checkpoint(
    model, tokenizer, output_dir: str | os.PathLike, max_shard_size: str | int = "5GB", overwrite: bool = False,
    *, inputs: checkpoint_writer.Inputs = None, adapter_dir: str | os.PathLike | None = None,
    dequantized: bool | None = None,
) -> Path:
    """Save `model` (released layout) + tokenizer + model card to `output_dir` whole or not at all
    (`checkpoint_writer.save_checkpoint`). With `adapter_dir` the card is the merged card of that adapter (LoRA or
    ESFT: its training setup, `dequantized` for a QLoRA base)."""
    output_dir = Path(output_dir)
    location = str(output_dir.absolute())

    def write_card(staging: Path) -> None:
        from deepseekmoe.model_cards.card import write_merged_card

        write_merged_card(staging, adapter_dir, model.config, model_name=output_dir.name, location=location,
                          dequantized=dequantized)

    return checkpoint_writer.save_checkpoint(
        model, output_dir, tokenizer=tokenizer, max_shard_size=max_shard_size, overwrite=overwrite, inputs=inputs,
        finalize=write_card if adapter_dir is not None else None,
    )


def _tokenizer_source(adapter_dir, base) -> str:
    adapter_dir = Path(adapter_dir)
    has_tokenizer = any((adapter_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return str(adapter_dir if has_tokenizer else base)
