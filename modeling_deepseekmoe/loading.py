"""Loading a DeepSeekMoE checkpoint: the one meaning of a dtype name and of `load_in_4bit` / `load_in_8bit`.

    model = load_pretrained_model("deepseek-moe-16b-chat", dtype="bfloat16", load_in_4bit=True)

- dtype names: "auto" (the checkpoint's), "bfloat16", "float16", "float32" (`resolve_dtype`);
- quantization flags, named as TRL's `ModelConfig` / transformers' `BitsAndBytesConfig` name them
  (`QuantizationArguments`): `load_in_4bit` means nf4 with double quantization (`use_bnb_nested_quant`) and a bf16
  compute dtype where the device computes in bf16 (fp16 on GPUs without bf16, fp32 on CPUs without bf16 matmul
  instructions), unless `bnb_4bit_compute_dtype` or an explicit `dtype` says otherwise; `load_in_8bit` is LLM.int8.
  `quantization_config(...)` is the one place a `BitsAndBytesConfig` is built;
- a local checkpoint is loaded (and so recorded in `config.name_or_path`, PEFT's `adapter_config.json` and model
  cards) under its absolute path (`model_reference`); a hub id stays as given.

Adapters (LoRA, ESFT) are applied on top by `deepseekmoe.finetune.adapters.load_model`, which calls this.
"""

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .checkpoint import check_model_type


# The storage formats of `footprint.PRECISIONS`, as the loading flags that give them.
PRECISION_FLAGS = {
    "bf16": {},
    "int8": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "use_bnb_nested_quant": False},
    "nf4-dq": {"load_in_4bit": True},
}
DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANT_TYPES = ("nf4", "fp4")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_dtype(dtype) -> torch.dtype | str:
    """`torch.dtype` (or "auto") for a dtype name of `DTYPES` or a `torch.dtype`; a ValueError naming the choices."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def dtype_name(dtype) -> str:
    """"bfloat16" for torch.bfloat16 (or for "bfloat16"), "auto" for "auto"."""
    resolved = resolve_dtype(dtype)
    return resolved if isinstance(resolved, str) else str(resolved).removeprefix("torch.")


def default_compute_dtype() -> torch.dtype:
    """bf16 where the device computes in it natively: a GPU with bf16 (fp16 on one without), a CPU with bf16 matmul
    instructions (AVX512-BF16 / AMX); fp32 on other CPUs, where bf16 matmuls are emulated."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    cpu_has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if cpu_has_bf16 else torch.float32


@dataclass
class QuantizationArguments:
    """bitsandbytes loading, under the flag names of TRL's `ModelConfig` (and transformers' for the compute dtype)."""

    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the base in 4-bit (bitsandbytes; routed experts included): nf4, double quant."},
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8-bit (LLM.int8), experts too."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type.", "choices": list(QUANT_TYPES)}
    )
    use_bnb_nested_quant: bool = field(
        default=True, metadata={"help": "Double quantization of the 4-bit scales (saves ~0.4 bit per weight)."}
    )
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Compute dtype of the 4-bit layers (default: --dtype if given, else bfloat16 where the device "
            "has it, else float32).",
            "choices": [None, "bfloat16", "float16", "float32"],
        },
    )
    bnb_4bit_quant_storage: str | None = field(
        default=None, metadata={"help": "Storage dtype of the packed 4-bit weights (bitsandbytes' default: uint8)."}
    )

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("Choose one of --load_in_4bit and --load_in_8bit.")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(f"--bnb_4bit_quant_type must be one of {QUANT_TYPES}, got {self.bnb_4bit_quant_type!r}.")
        if self.bnb_4bit_compute_dtype is not None:
            resolve_dtype(self.bnb_4bit_compute_dtype)

    @property
    def quantization(self) -> str | None:
        """"4bit", "8bit" or None."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    @property
    def precision(self) -> str:
        """The storage format's name in `PRECISION_FLAGS` / `footprint.PRECISIONS` ("bf16" when unquantized; an fp4
        4-bit load is sized as nf4)."""
        if self.load_in_8bit:
            return "int8"
        if self.load_in_4bit:
            return "nf4-dq" if self.use_bnb_nested_quant else "nf4"
        return "bf16"

    def quantization_options(self) -> dict:
        """The quantization flags only (what a run records and a loader takes back)."""
        return {f.name: getattr(self, f.name) for f in fields(QuantizationArguments)}

    @classmethod
    def from_dict(cls, values: dict | None) -> "QuantizationArguments":
        """From any mapping holding (some of) the flags, e.g. a recorded run's model arguments."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in (values or {}).items() if key in names})

    def bnb_config(self, dtype="auto", llm_int8_skip_modules: list[str] | None = None):
        return quantization_config(**self.quantization_options(), dtype=dtype,
                                   llm_int8_skip_modules=llm_int8_skip_modules)  # fmt: skip


def quantization_config(
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    use_bnb_nested_quant: bool = True,
    bnb_4bit_compute_dtype=None,
    bnb_4bit_quant_storage=None,
    dtype="auto",
    llm_int8_skip_modules: list[str] | None = None,
):
    """The `BitsAndBytesConfig` the flags stand for (None without quantization). The 4-bit compute dtype is
    `bnb_4bit_compute_dtype`, else an explicit `dtype`, else `default_compute_dtype()`."""
    QuantizationArguments(load_in_4bit, load_in_8bit, bnb_4bit_quant_type, use_bnb_nested_quant,
                          bnb_4bit_compute_dtype)  # fmt: skip  (validates the combination)
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    extra = {"llm_int8_skip_modules": llm_int8_skip_modules} if llm_int8_skip_modules is not None else {}
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, **extra)
    compute = resolve_dtype(bnb_4bit_compute_dtype) if bnb_4bit_compute_dtype is not None else resolve_dtype(dtype)
    if not isinstance(compute, torch.dtype):
        compute = default_compute_dtype()
    if bnb_4bit_quant_storage is not None:
        extra["bnb_4bit_quant_storage"] = getattr(torch, str(bnb_4bit_quant_storage).removeprefix("torch."))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute,
        **extra,
    )


def model_reference(name_or_path: str | os.PathLike) -> str:
    """A local path as an absolute path, a hub id as given; a path that exists nowhere is a FileNotFoundError."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return os.path.abspath(path)
    if path.is_absolute() or text.startswith((".", "~")) or not _HUB_ID.match(text):
        raise FileNotFoundError(f"No checkpoint at {text}: no such directory (and not a hub id).")
    return text


def load_pretrained_model(
    model_name_or_path: str | os.PathLike,
    *,
    dtype="auto",
    quantization: "QuantizationArguments | dict | None" = None,
    device_map=None,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    model_class=None,
    **kwargs,
):
    """`from_pretrained` with the project's meaning of dtype and quantization. `quantization` is a
    `QuantizationArguments` or a dict of its flags; the flags may also be passed as keyword arguments
    (`load_in_4bit=True, bnb_4bit_quant_type="nf4", ...`). Other keyword arguments go to `from_pretrained`
    (`quantization_config=` is taken as given when no flag asks for quantization)."""
    flag_names = {f.name for f in fields(QuantizationArguments)}
    flags = {name: kwargs.pop(name) for name in list(kwargs) if name in flag_names}
    if isinstance(quantization, QuantizationArguments):
        flags = {**quantization.quantization_options(), **flags}
    elif quantization is not None:
        flags = {**dict(quantization), **flags}
    options = QuantizationArguments.from_dict(flags)
    torch_dtype = resolve_dtype(dtype)
    bnb = options.bnb_config(torch_dtype)
    if bnb is not None:
        if kwargs.get("quantization_config") is not None:
            raise ValueError("Pass either quantization flags (load_in_4bit / load_in_8bit) or quantization_config.")
        kwargs["quantization_config"] = bnb
        if device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}  # bitsandbytes quantizes on the device it computes on
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    model_class = model_class or AutoModelForCausalLM
    if not kwargs.setdefault("trust_remote_code", False):
        check_model_type(model_name_or_path)  # before transformers would offer to run the checkpoint's code
    if device_map is None:
        _check_fits_in_memory(model_name_or_path, torch_dtype, options)
    return model_class.from_pretrained(model_reference(model_name_or_path), dtype=torch_dtype, **kwargs)



def _check_fits_in_memory(model_name_or_path, torch_dtype, options: QuantizationArguments) -> None:
    """Before reading any weight: refuse a CPU load of a local checkpoint whose weights do not fit in memory."""
    config_file = Path(os.fspath(model_name_or_path)).expanduser() / "config.json"
    if torch.cuda.is_available() or not config_file.is_file():
        return
    from .configuration_deepseekmoe import DeepseekMoEConfig
    from .footprint import check_fits_in_memory

    config = DeepseekMoEConfig.from_json_file(config_file)
    if options.quantization is not None:
        precision, scale = options.precision, 1.0
    else:
        dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else resolve_dtype(
            str(getattr(config, "torch_dtype", None) or "float32").removeprefix("torch."))  # fmt: skip
        precision, scale = "bf16", (2.0 if dtype == torch.float32 else 1.0)
    check_fits_in_memory(config, precision, scale)


def quantization_record(options: QuantizationArguments, dtype="auto") -> dict | None:
    """What a run records about its quantization: the flags with the compute dtype resolved (None if unquantized)."""
    bnb = options.bnb_config(dtype)
    if bnb is None:
        return None
    record = asdict(options)
    if bnb.load_in_4bit:
        record["bnb_4bit_compute_dtype"] = dtype_name(bnb.bnb_4bit_compute_dtype)
    return record
