"""Loading a DeepSeekMoE with an adapter: the one loader of every command (chat, generate, eval, analyze, esft
score, merge, esft merge) and of the library.

    model = load_model("deepseek-moe-16b-chat", adapter="runs/lora", dtype="bfloat16", load_in_4bit=True)

An adapter directory is recognised by its files:
- `esft_adapter.json` (+ `expert_config.json`, `adapter_model.safetensors`): an ESFT adapter, whose expert weights
  are written into the base (`finetune.esft.adapter.apply_esft_adapter`); it cannot go into 4/8-bit experts;
- `adapter_config.json`: a PEFT LoRA adapter, the project's expert LoRA included (`finetune.lora.load_lora_adapter`
  registers the fused-experts layer that plain `PeftModel.from_pretrained` does not know). An adapter tensor that
  finds no place in the base is an error, not PEFT's warning.

Model path, dtype and quantization flags mean what `modeling_deepseekmoe.loading` says (`--load_in_4bit`: nf4 with
double quantization, bf16 compute where supported). `add_loading_arguments` / `loading_options` give every
command the same flags for them.
"""

import argparse
import json
import os
from dataclasses import MISSING, fields
from pathlib import Path

from modeling_deepseekmoe.loading import DTYPES, QuantizationArguments, load_pretrained_model, model_reference


LORA, ESFT = "lora", "esft"
LORA_CONFIG_FILE = "adapter_config.json"
ESFT_METADATA_FILE = "esft_adapter.json"  # the file that marks a complete ESFT adapter (finetune.esft.adapter)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def adapter_kind(adapter_dir: str | os.PathLike) -> str:
    """"lora" or "esft", from the files in `adapter_dir`; an error naming what is missing otherwise."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"No adapter directory at {adapter_dir}.")
    if (path / ESFT_METADATA_FILE).is_file():
        return ESFT
    if (path / LORA_CONFIG_FILE).is_file():
        return LORA
    if (path / "config.json").is_file():
        raise ValueError(
            f"{adapter_dir} is a full checkpoint, not an adapter: load it as the model (without --adapter)."
        )
    raise ValueError(
        f"{adapter_dir} is not an adapter: it has neither {LORA_CONFIG_FILE} (LoRA) nor {ESFT_METADATA_FILE} (ESFT)."
    )


def adapter_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model an adapter records (PEFT's `base_model_name_or_path`, or the ESFT adapter's)."""
    path = Path(adapter_dir)
    file_name = ESFT_METADATA_FILE if adapter_kind(path) == ESFT else LORA_CONFIG_FILE
    return json.loads((path / file_name).read_text()).get("base_model_name_or_path")


def is_quantized(model) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "quantization_config", None) is not None


def apply_adapter(model, adapter_dir: str | os.PathLike, *, is_trainable: bool = False):
    """`model` with the adapter in `adapter_dir` applied: a `PeftModel` for LoRA, the model itself (experts
    overwritten in place) for ESFT. A mismatch with the base is a ValueError saying so."""
    kind = adapter_kind(adapter_dir)
    if kind == ESFT:
        if is_quantized(model):
            raise ValueError(_ESFT_QUANTIZED)
        from .esft.adapter import apply_esft_adapter

        return apply_esft_adapter(model, adapter_dir)
    return _apply_lora(model, adapter_dir, is_trainable)


_ESFT_QUANTIZED = (
    "ESFT adapters replace expert weights and cannot be written into 4/8-bit experts: merge the adapter "
    "(deepseekmoe esft merge), then load the merged checkpoint in 4-bit."
)


def _apply_lora(model, adapter_dir, is_trainable: bool):
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from .lora import load_lora_adapter

    try:
        wrapped = load_lora_adapter(model, adapter_dir, is_trainable=is_trainable)
        # PEFT only warns about adapter tensors that find no module in the base; here that is an error.
        result = set_peft_model_state_dict(wrapped, load_peft_weights(str(adapter_dir)))
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"The LoRA adapter {adapter_dir} does not match the base model: {err}") from err
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(
            f"The LoRA adapter {adapter_dir} does not match the base model: {len(unexpected)} adapter tensor(s) have "
            f"no place in it, e.g. {unexpected[:3]}."
        )
    return wrapped


def load_model(
    model_name_or_path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    dtype="auto",
    quantization: QuantizationArguments | dict | None = None,
    device_map=None,
    is_trainable: bool = False,
    **kwargs,
):
    """The base model (`modeling_deepseekmoe.loading.load_pretrained_model`: dtype, quantization flags such as
    `load_in_4bit=True`, `attn_implementation`, `experts_implementation`, other `from_pretrained` arguments) with
    the adapter in `adapter` (a LoRA or ESFT directory) applied. Not put in eval mode: callers decide."""
    if adapter is not None:
        kind = adapter_kind(adapter)  # before the (long) base load
        options = QuantizationArguments.from_dict({**_flags(quantization), **kwargs})
        if kind == ESFT and (options.quantization or kwargs.get("quantization_config") is not None):
            raise ValueError(_ESFT_QUANTIZED)
    model = load_pretrained_model(model_name_or_path, dtype=dtype, quantization=quantization, device_map=device_map,
                                  **kwargs)  # fmt: skip
    return model if adapter is None else apply_adapter(model, adapter, is_trainable=is_trainable)


def _flags(quantization) -> dict:
    if isinstance(quantization, QuantizationArguments):
        return quantization.quantization_options()
    return dict(quantization or {})


def tokenizer_source(model_name_or_path: str | os.PathLike, adapter: str | os.PathLike | None = None) -> str:
    """The adapter directory when it holds a tokenizer (SFT outputs do, with the chat template trained on), else the
    model's."""
    if adapter is not None and any((Path(adapter) / name).is_file() for name in TOKENIZER_FILES):
        return model_reference(adapter)
    return model_reference(model_name_or_path)


def load_tokenizer(model_name_or_path: str | os.PathLike, adapter: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    import modeling_deepseekmoe  # noqa: F401  (AutoTokenizer reads config.json: the model type must be known)

    return AutoTokenizer.from_pretrained(tokenizer_source(model_name_or_path, adapter), trust_remote_code=False)


# --------------------------------------------------------------------------------------------------------------------
# The same loading flags in every command


def _bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y"):
        return True
    if value in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_loading_arguments(parser, adapter: bool = True, device_map: bool = True) -> None:
    """`--adapter` (also spelled `--adapter_name_or_path`), `--dtype`, `--device_map` and the quantization flags of
    `QuantizationArguments`, on an argparse parser or argument group; read them back with `loading_options`."""
    if adapter:
        parser.add_argument("--adapter", "--adapter_name_or_path", dest="adapter", default=None, metavar="DIR",
                            help="a LoRA or ESFT adapter directory to apply (recognised by its files)")  # fmt: skip
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="weights dtype (auto: the checkpoint's)")  # fmt: skip
    if device_map:
        parser.add_argument("--device_map", default=None, help='e.g. "auto" to spread the model over the GPUs')
    for option in fields(QuantizationArguments):
        kwargs = {"default": option.default if option.default is not MISSING else None,
                  "help": option.metadata.get("help")}  # fmt: skip
        choices = [choice for choice in option.metadata.get("choices", []) if choice is not None]
        if option.type in (bool, "bool"):
            if option.default is False:
                kwargs["action"] = "store_true"
            else:
                kwargs.update(type=_bool, nargs="?", const=True, metavar="true|false")
        elif choices:
            kwargs["choices"] = choices
        parser.add_argument(f"--{option.name}", **kwargs)


def loading_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `load_model` (besides the model path) from flags added by `add_loading_arguments`."""
    names = ["adapter", "dtype", "device_map"] + [option.name for option in fields(QuantizationArguments)]
    return {name: getattr(args, name) for name in names if hasattr(args, name)}
