"""Merge a LoRA / QLoRA adapter into its base and write a plain checkpoint in the released layout.

    merge_adapter("deepseek-moe-16b-chat", "sft-output", "merged")

The result is what the native model, the reference remote code and vLLM load: per-expert safetensors shards + index
(`model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`, expert LoRA merged into them), `config.json` with
`model_type: "deepseek"`, and the tokenizer (the adapter's, which carries the chat template, else the base's).
It is written to a staging folder, checked against the released layout (`validate_checkpoint`) and then renamed.

A QLoRA adapter (trained on a 4-bit / 8-bit base, as recorded in the run's `sft_run.json`) is merged into the
dequantized base weights, the weights it was trained against, unless `quantization="none"` asks for the original
full-precision base.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, BitsAndBytesConfig

from modeling_deepseekmoe import DeepseekMoEForCausalLM
from modeling_deepseekmoe.checkpoint import validate_checkpoint

from .lora import load_lora_adapter, merge_lora


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
    if quantization == "auto":
        quantization = adapter_run_info(adapter_dir).get("quantization") or "none"
    torch_dtype = _resolve_dtype(dtype, base_model_name_or_path)
    if quantization == "none":
        base = DeepseekMoEForCausalLM.from_pretrained(base_model_name_or_path, dtype=torch_dtype)
        merged = merge_lora(load_lora_adapter(base, adapter_dir))
    else:
        from modeling_deepseekmoe.quantization import merge_adapter_into_dequantized_model

        bnb = BitsAndBytesConfig(load_in_8bit=True)
        if quantization == "4bit":
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=_run_quant_type(adapter_dir),
                bnb_4bit_use_double_quant=_run_nested_quant(adapter_dir),
                bnb_4bit_compute_dtype=torch_dtype,
            )
        base = DeepseekMoEForCausalLM.from_pretrained(
            base_model_name_or_path, dtype=torch_dtype, quantization_config=bnb
        )
        merged = merge_adapter_into_dequantized_model(load_lora_adapter(base, adapter_dir), dtype=torch_dtype)
    merged.to(torch_dtype)
    merged.config.output_router_logits = False
    merged.config.use_cache = True
    return merged


def _run_model_args(adapter_dir) -> dict:
    return adapter_run_info(adapter_dir).get("model_args", {})


def _run_quant_type(adapter_dir) -> str:
    return _run_model_args(adapter_dir).get("bnb_4bit_quant_type", "nf4")


def _run_nested_quant(adapter_dir) -> bool:
    return bool(_run_model_args(adapter_dir).get("use_bnb_nested_quant", True))


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
    check_output_dir(output_dir, overwrite)
    model = merged_model(base_model_name_or_path, adapter_dir, dtype, quantization)
    tokenizer_source = tokenizer_name_or_path or _tokenizer_source(adapter_dir, base_model_name_or_path)
    card = {"base_model": str(base_model_name_or_path), "method": f"LoRA adapter {adapter_dir} merged"}
    return write_checkpoint(model, AutoTokenizer.from_pretrained(tokenizer_source), output_dir, max_shard_size,
                            overwrite, card)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace.")
    return output_dir


def write_checkpoint(
    model, tokenizer, output_dir: str | os.PathLike, max_shard_size: str | int = "5GB", overwrite: bool = False,
    card: dict | None = None,
) -> Path:
    """Save `model` (released layout) + tokenizer + model card to `output_dir` whole or not at all: written to a
    staging folder, checked with `validate_checkpoint`, then renamed."""
    from deepseekmoe.model_card import architecture_summary, write_model_card

    output_dir = check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        validate_checkpoint(staging, model.config)
        if card is not None:
            write_model_card(staging, "sft", model_name=output_dir.name, adapter=False,
                             training=architecture_summary(model.config), **card)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _tokenizer_source(adapter_dir, base) -> str:
    adapter_dir = Path(adapter_dir)
    has_tokenizer = any((adapter_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return str(adapter_dir if has_tokenizer else base)
