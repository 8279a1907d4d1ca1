"""bitsandbytes 4-bit / 8-bit DeepSeekMoE in which the routed experts really are quantized.

transformers' bitsandbytes quantizer only replaces `nn.Linear` modules, so the fused routed experts
(`DeepseekMoEExperts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, ~90% of the weights) would stay in bf16.
With a `BitsAndBytesConfig`, `DeepseekMoEPreTrainedModel.from_pretrained` therefore:

1. builds `DeepseekMoEQuantizedExperts` in place of every `DeepseekMoEExperts` (while the model is built on the meta
   device), one `nn.Linear` per expert projection, so transformers' quantizer turns them into bnb `Linear4bit` /
   `Linear8bitLt` and quantizes each released per-expert tensor as it arrives (peak memory: one expert matrix);
2. after loading, keeps the bnb weights but drops the `nn.Linear` interface (`DeepseekMoEExpertWeight`), so PEFT's
   `all-linear` / `target_modules` never wrap a routed expert whose forward is not called.

Inside the model these per-expert modules are named `mlp.experts.{j}.{gate,up,down}` (not `*_proj`, which the
checkpoint conversion would fuse); `from_pretrained` maps the released names onto them and `save_pretrained` maps
them back, so a quantized model saves as the released per-expert layout plus bitsandbytes' statistics, and reloads.

The experts' forward dequantizes the weights it needs (on CPU only the experts hit, on GPUs all of them, without a
host sync) into the fused layout and runs the configured experts implementation on them: it equals the forward of
the model with dequantized weights (`dequantize_model`). Under autograd the dequantized weights are recomputed in
the backward rather than kept. Inference calls on a CPU with AVX512-BF16 run bitsandbytes' packed 4-bit kernel instead,
in the routed experts and the `Linear4bit` layers, wherever the shape allows (`configure_4bit_cpu_kernels`). The router (`mlp.gate`, a bare parameter), norms, embeddings and lm_head are never
converted; attention, shared experts and dense MLPs are bnb `Linear4bit` / `Linear8bitLt` as usual.
"""

import copy
import ctypes
import functools
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BitsAndBytesConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate
from transformers.utils import is_bitsandbytes_available

from . import bnb_cpu_quantize, cpu_4bit_kernel
from .configuration_deepseekmoe import DeepseekMoEConfig
from .experts_kernels import _UPCAST_MIN_ROWS, _emulates_low_precision_matmul
from .modeling_deepseekmoe import DeepseekMoEExperts, DeepseekMoEGate, DeepseekMoESparseMoeBlock


if is_bitsandbytes_available():
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant


# Released per-expert names -> the names inside the quantized model (see the module docstring). One capture group per
# pattern and escaped dots on both sides, so that transformers' reversed renaming (on save) matches exactly.
EXPERT_KEY_MAPPING = {
    rf"mlp\.experts\.(\d+)\.{projection}_proj\.": rf"mlp\.experts\.\1\.{projection}\."
    for projection in ("gate", "up", "down")
}
EXPERT_PROJECTIONS = ("gate", "up", "down")
# Experts implementations that only read the weights of the experts a token was routed to.
HIT_ONLY_IMPLEMENTATIONS = ("auto", "sorted_loop", "eager")
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


# --------------------------------------------------------------------------------------------------------------------
# Configuration checks


def require_bitsandbytes(purpose: str = "4-bit / 8-bit loading") -> None:
    if not is_bitsandbytes_available():
        raise ImportError(
            f"DeepSeekMoE {purpose} needs bitsandbytes, which is not installed: "
            "`pip install 'bitsandbytes>=0.50'` (or `pip install -e '.[quant]'` in this repository)."
        )


def resolve_bnb_config(quantization_config) -> BitsAndBytesConfig | None:
    """The `BitsAndBytesConfig` a `quantization_config` argument (object or dict) stands for; `None` for none.

    Other quantization methods are refused: transformers would quantize only the `nn.Linear` modules and leave the
    routed experts, 90% of the weights, in full precision."""
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
        if method != "bitsandbytes":
            _raise_unsupported_method(method)
        quantization_config = BitsAndBytesConfig.from_dict(dict(quantization_config))
    if not isinstance(quantization_config, BitsAndBytesConfig):
        method = getattr(quantization_config, "quant_method", type(quantization_config).__name__)
        _raise_unsupported_method(getattr(method, "value", method))
    if not (quantization_config.load_in_4bit or quantization_config.load_in_8bit):
        raise ValueError(
            "The BitsAndBytesConfig sets neither load_in_4bit nor load_in_8bit; pass BitsAndBytesConfig("
            "load_in_4bit=True, bnb_4bit_quant_type='nf4') or BitsAndBytesConfig(load_in_8bit=True)."
        )
    return quantization_config


def _raise_unsupported_method(method) -> None:
    raise ValueError(
        f"quantization method {method!r} is not supported for DeepSeekMoE: it would quantize only the nn.Linear "
        "modules and leave the fused routed experts (90% of the weights) in full precision. Use bitsandbytes: "
        "quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4') or "
        "BitsAndBytesConfig(load_in_8bit=True)."
    )


def _reject_shortcut_flags(kwargs: dict) -> None:
    for flag in ("load_in_4bit", "load_in_8bit"):
        if kwargs.get(flag):
            raise TypeError(
                f"from_pretrained(..., {flag}=True) is not accepted by transformers 5; pass "
                f"quantization_config=BitsAndBytesConfig({flag}=True) instead."
            )


def requested_bnb_config(pretrained_model_name_or_path, kwargs: dict) -> BitsAndBytesConfig | None:
    """The bitsandbytes config a `from_pretrained` call loads with: passed in, or saved with a quantized checkpoint."""
    _reject_shortcut_flags(kwargs)
    saved = _saved_quantization_config(pretrained_model_name_or_path, kwargs)
    if saved is not None:
        return resolve_bnb_config(saved)
    return resolve_bnb_config(kwargs.get("quantization_config"))


def _saved_quantization_config(pretrained_model_name_or_path, kwargs: dict):
    config = kwargs.get("config")
    if isinstance(config, PreTrainedConfig):
        return getattr(config, "quantization_config", None)
    if pretrained_model_name_or_path is None or kwargs.get("gguf_file") is not None:
        return None
    download_kwargs = {key: kwargs[key] for key in _DOWNLOAD_KWARGS if key in kwargs}
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **download_kwargs)
    except (OSError, ValueError):
        return None  # e.g. an adapter directory: transformers resolves it (and reports errors) itself
    return config_dict.get("quantization_config")


def is_prequantized(config: PreTrainedConfig) -> bool:
    """Whether a config describes a checkpoint saved quantized (bnb statistics stored next to each weight)."""
    return getattr(config, "quantization_config", None) is not None


# --------------------------------------------------------------------------------------------------------------------
# Quantized weights


def is_bnb_linear(module: nn.Module) -> bool:
    return is_bitsandbytes_available() and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized_weight(weight: torch.Tensor) -> bool:
    if not is_bitsandbytes_available():
        return False
    if isinstance(weight, bnb.nn.Params4bit):
        return weight.bnb_quantized
    return isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8


# --------------------------------------------------------------------------------------------------------------------
# bitsandbytes' 4-bit CPU kernels
#
# On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a `Linear4bit` weight on its first inference call (eval mode,
# input without grad) into the layout of a fused kernel that computes in bf16: 5-15x faster than dequantize-then-matmul
# at 1-16 rows, in bf16 and fp32 (benchmarks/results/bnb4_cpu_paths.md). What bitsandbytes leaves to its caller:
# - the layout takes only [out, in] weights with out % 32 == 0 and in a multiple of the quantization block; the
#   repacking of any other shape crashes (`shape '[32, 0]' is invalid for input of size 16`);
# - its unpacking (`state_dict()`, `.cuda()`) re-quantizes the block scales of a double-quantized weight and leaves
#   those of the others in the packed order: after an inference call, `state_dict()` corrupts such a layer;
# - a packed layer passes no gradient to its input (a training step after an evaluation).
# So the packed kernel is switched on only for the shapes it takes (`support_avx512bf16_for_cpu`, bitsandbytes' switch
# on each `Linear4bit`); the weights are packed here, before bitsandbytes would, keeping the statistics they were
# quantized with, which unpacking restores exactly; and they are unpacked before a call that is not an inference call
# and before they are saved. Routed experts take the same kernel for inference (`DeepseekMoEExpertWeight.linear`).
#
# Separately, bitsandbytes' AVX512 `dequantize_4bit` (any AVX512 CPU) reads one scale per (row, block) and so is wrong
# when in_features is not a multiple of the block size (a block then spans rows): such weights are dequantized with
# torch ops here (`Linear4bitExactCpuDequantize`, `dequantize_weight`). The released dims are all multiples of 64.
#
# On CPUs without that packed kernel (AVX2, AVX512 without BF16), bitsandbytes dequantizes the whole matrix for every
# call, also for the one row of a decode step. There, calls of up to `CPU_KERNEL_MAX_ROWS` rows run the project's own
# kernel (`cpu_4bit_kernel`), which reads the 4-bit codes in the plain layout; longer calls dequantize with the
# project's kernel (into reused memory) and run a GEMM. The crossover, at the released shapes on 2 threads: 12-16 rows
# on AVX2 (benchmarks/results/cpu_4bit_kernel_avx2.md), 4 on AVX512-BF16 (cpu_4bit_kernel.md, with bitsandbytes'
# dequantization then); AVX512 without BF16 is not measured and takes 4. Where the packed kernel exists it stays:
# equal at 1 row, faster at more, and one layout per weight.

_PACKED_LAYOUT_ROW_TILE = 32  # `_convert_weight_packed_for_cpu`'s block_n
_PACKED_KERNEL_FUNCTIONS = (
    "has_avx512bf16",
    "_convert_weight_packed_for_cpu",
    "_convert_weight_packed_for_cpu_inverse",
)
PACKED_KERNEL_PATH = "bitsandbytes packed AVX512-BF16 kernel"
DEQUANTIZE_KERNEL_PATH = "dequantize + matmul"
OWN_KERNEL_PATH = "deepseekmoe 4-bit kernel"
CPU_KERNEL_MAX_ROWS = 12 if cpu_4bit_kernel.native_isa() == "avx2" else 4


def own_4bit_cpu_kernel_available() -> bool:
    """Whether `cpu_4bit_kernel` serves here: built for a vector ISA (AVX2 or AVX512; the portable build measured no
    faster than dequantize + matmul), on a CPU where bitsandbytes' packed kernel is not available."""
    return (
        not packed_4bit_cpu_kernel_available()
        and cpu_4bit_kernel.native_isa() != "portable"
        and cpu_4bit_kernel.available()
    )


def _takes_own_kernel(weight: torch.Tensor) -> bool:
    state = _quantized_4bit_state(weight)
    return state is not None and cpu_4bit_kernel.fits(state)


def _own_kernel_call(x: torch.Tensor) -> bool:
    """Whether a call with input `x` is one the own kernel takes: an inference call on the CPU of a few rows."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return x.device.type == "cpu" and not needs_grad and 0 < rows <= CPU_KERNEL_MAX_ROWS


def packed_4bit_cpu_kernel_available() -> bool:
    """Whether bitsandbytes' packed 4-bit CPU kernel runs here: a bitsandbytes that has it, on a CPU with AVX512-BF16
    (`DEEPSEEKMOE_BNB_PACKED_KERNEL=0` turns it off, as on a CPU without it)."""
    if not is_bitsandbytes_available():
        return False
    if cpu_4bit_kernel.switched_off("DEEPSEEKMOE_BNB_PACKED_KERNEL"):
        return False
    functional = bnb.functional
    return all(hasattr(functional, name) for name in _PACKED_KERNEL_FUNCTIONS) and bool(functional.has_avx512bf16())


def packed_4bit_layout_fits(out_features: int, in_features: int, blocksize: int = 64) -> bool:
    """Whether bitsandbytes' packed CPU layout takes an [out, in] 4-bit weight quantized in blocks of `blocksize`."""
    return out_features % _PACKED_LAYOUT_ROW_TILE == 0 and in_features > 0 and in_features % blocksize == 0


def _quantized_4bit_state(weight: torch.Tensor):
    """The plain-layout quant state of a quantized 4-bit weight; None for any other tensor."""
    if not (isinstance(weight, bnb.nn.Params4bit) and weight.bnb_quantized and weight.quant_state is not None):
        return None
    return _plain_quant_state(weight)


def _takes_packed_layout(weight: torch.Tensor) -> bool:
    state = _quantized_4bit_state(weight)
    return state is not None and len(state.shape) == 2 and packed_4bit_layout_fits(*state.shape, state.blocksize)


def is_packed_for_cpu(weight: torch.Tensor) -> bool:
    """Whether a 4-bit weight is in bitsandbytes' packed CPU layout."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _pack_for_cpu(weight, module: nn.Module | None = None) -> None:
    """Repack a 4-bit weight in place into the packed CPU layout, keeping the statistics `_plain_4bit` restores."""
    original = weight.quant_state
    data, packed = bnb.functional._convert_weight_packed_for_cpu(weight.data, copy.deepcopy(original))
    packed.unpacked_quant_state = original
    _set_4bit(weight, data, packed, module)


def _unpack_for_cpu(weight, module: nn.Module | None = None) -> None:
    if is_packed_for_cpu(weight):
        _set_4bit(weight, *_plain_4bit(weight), module)


def _plain_quant_state(weight):
    original = getattr(weight.quant_state, "unpacked_quant_state", None)
    return weight.quant_state if original is None else original


def _plain_4bit(weight) -> tuple:
    """(data, quant state) of a packed 4-bit weight in the plain layout, as it was quantized."""
    data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(weight.quant_state))
    original = getattr(weight.quant_state, "unpacked_quant_state", None)
    if original is not None:
        return data, original
    if not state.nested:  # packed by bitsandbytes itself, whose unpacking leaves the scales [in / block, out] in bf16
        state.absmax = state.absmax.T.reshape(-1).float()
    return data, state


def _set_4bit(weight, data: torch.Tensor, state, module: nn.Module | None) -> None:
    weight.data, weight.quant_state = data, state
    if module is not None:
        module.quant_state = state  # Linear4bit keeps a second reference, read when the weight has lost its own


def _keep_4bit_layout_for_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of every `Linear4bit`: the weight packed for bitsandbytes' inference case (CPU, eval mode,
    input without grad) where the module's switch is on, in the plain layout otherwise."""
    x = args[0] if args else kwargs["x"]
    packed = module.support_avx512bf16_for_cpu and x.device.type == "cpu" and not module.training
    packed = packed and not x.requires_grad
    if packed and not is_packed_for_cpu(module.weight):
        _pack_for_cpu(module.weight, module)
    elif not packed:
        _unpack_for_cpu(module.weight, module)


def _unpack_before_saving(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    _unpack_for_cpu(module.weight, module)


def _configure_linear4bit(module: nn.Module, packed: bool, own: bool = False) -> None:
    module.support_avx512bf16_for_cpu = packed
    module.own_kernel = own
    if _keep_4bit_layout_for_call not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_keep_4bit_layout_for_call, with_kwargs=True)
    if _unpack_before_saving not in module._state_dict_pre_hooks.values():
        module.register_state_dict_pre_hook(_unpack_before_saving)
    if not packed:
        _unpack_for_cpu(module.weight, module)
    state = module.weight.quant_state
    inexact = state is not None and not _bnb_dequantizes_exactly(state)
    if type(module) is bnb.nn.Linear4bit and module.weight.device.type == "cpu" and (inexact or own):
        module.__class__ = Linear4bitExactCpuDequantize


def _dequantize_4bit(data: torch.Tensor, state, dtype: torch.dtype | None = None, out: torch.Tensor | None = None):
    """The dense value in `dtype` (or written into `out`): on CPU with the project's kernel where it is built
    (bit-equal to bitsandbytes, 12x faster than its CPU dequantization on AVX2), else bitsandbytes' (or torch ops where
    bitsandbytes' is wrong)."""
    if data.device.type == "cpu" and cpu_4bit_kernel.dequantizes(state) and cpu_4bit_kernel.available():
        return cpu_4bit_kernel.dequantize(data, state, dtype, out)
    if data.device.type == "cpu" and not _bnb_dequantizes_exactly(state):
        dense = _dequantize_4bit_with_torch(data, state)
    else:
        dense = dequantize_4bit(data, state)
    if out is not None:
        return out.copy_(dense)
    return dense if dtype is None else dense.to(dtype)


def _bnb_dequantizes_exactly(state) -> bool:
    return state.shape[-1] % state.blocksize == 0 or _bnb_cpu_dequantize_handles_blocks_across_rows()


@functools.cache
def _bnb_cpu_dequantize_handles_blocks_across_rows() -> bool:
    """Whether bitsandbytes' CPU `dequantize_4bit` is right for a weight whose blocks span rows (wrong on AVX512
    CPUs in bitsandbytes 0.50); checked once, so that a bitsandbytes that fixes it is used again."""
    weight = torch.arange(128, dtype=torch.float32).reshape(4, 32)  # 2 blocks of 64, with different scales
    data, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    return torch.equal(dequantize_4bit(data, state), _dequantize_4bit_with_torch(data, state))


def _dequantize_4bit_with_torch(data: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' 4-bit format dequantized with torch ops: two codes per byte (high nibble first) over the
    flattened weight, each block of `blocksize` codes scaled by its absmax (itself 8-bit quantized when nested)."""
    codes = data.contiguous().view(torch.uint8).reshape(-1)
    indices = torch.stack((codes >> 4, codes & 0xF), dim=-1).reshape(-1)[: state.shape.numel()]
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(absmax, state.state2) + state.offset
    values = state.code.to(torch.float32)[indices.long()]
    scales = absmax.float().repeat_interleave(state.blocksize)[: values.numel()]
    return (values * scales).reshape(state.shape).to(state.dtype)


def cpu_4bit_kernel_path(module_or_shape) -> str:
    """The CPU kernel that inference calls of a 4-bit layer run: a `Linear4bit` or `DeepseekMoEExpertWeight` as
    configured on this model, or an `(out_features, in_features)` shape (block size 64) as it would be configured."""
    if isinstance(module_or_shape, nn.Module):
        weight = getattr(module_or_shape, "weight", None)
        if not (is_bitsandbytes_available() and isinstance(weight, bnb.nn.Params4bit) and weight.bnb_quantized):
            return "none (not a 4-bit layer)"
        packed = getattr(module_or_shape, "support_avx512bf16_for_cpu", None)
        if packed is None:
            packed = getattr(module_or_shape, "packed_kernel", False)
        own = getattr(module_or_shape, "own_kernel", False)
    else:
        out_features, in_features = module_or_shape
        packed = packed_4bit_cpu_kernel_available() and packed_4bit_layout_fits(out_features, in_features)
        own = not packed and in_features % 64 == 0 and own_4bit_cpu_kernel_available()
    if packed:
        return PACKED_KERNEL_PATH
    if own:
        return f"{OWN_KERNEL_PATH} up to {CPU_KERNEL_MAX_ROWS} rows, else {DEQUANTIZE_KERNEL_PATH}"
    return DEQUANTIZE_KERNEL_PATH


def describe_cpu_4bit_kernels() -> str:
    """One line for bug reports (`deepseekmoe env`): which CPU kernels a 4-bit model loaded here would use."""
    if not is_bitsandbytes_available():
        return "none: bitsandbytes is not installed (`pip install 'bitsandbytes>=0.50'`)"
    if packed_4bit_cpu_kernel_available():
        line = (
            f"{PACKED_KERNEL_PATH} for inference on weights with out % {_PACKED_LAYOUT_ROW_TILE} == 0 and in a multiple "
            f"of the block size (64), else {DEQUANTIZE_KERNEL_PATH}"
        )
    else:
        if all(hasattr(bnb.functional, name) for name in _PACKED_KERNEL_FUNCTIONS):
            why = "bitsandbytes' packed 4-bit CPU kernel needs AVX512-BF16, which this CPU lacks"
            if cpu_4bit_kernel.switched_off("DEEPSEEKMOE_BNB_PACKED_KERNEL"):
                why = "bitsandbytes' packed 4-bit CPU kernel turned off by DEEPSEEKMOE_BNB_PACKED_KERNEL"
        else:
            why = f"this bitsandbytes {bnb.__version__} has no packed 4-bit CPU kernel"
        if own_4bit_cpu_kernel_available():
            line = (
                f"{OWN_KERNEL_PATH} ({cpu_4bit_kernel.native_isa()}) for inference calls of up to "
                f"{CPU_KERNEL_MAX_ROWS} rows, else {DEQUANTIZE_KERNEL_PATH} ({why})"
            )
        else:
            reason = cpu_4bit_kernel.unavailable_reason() or "the portable build is no faster"
            line = f"{DEQUANTIZE_KERNEL_PATH} ({why}; {OWN_KERNEL_PATH} unavailable: {reason})"
    if cpu_4bit_kernel.available():
        line += f"; dequantization by the {OWN_KERNEL_PATH}"
    elif not _bnb_cpu_dequantize_handles_blocks_across_rows():
        line += "; torch-op dequantization where in is not a multiple of the block size"
    return line


if is_bitsandbytes_available():

    class Linear4bitExactCpuDequantize(bnb.nn.Linear4bit):
        """A `Linear4bit` whose CPU forward runs the project's 4-bit kernel for short inference calls where
        `configure_4bit_cpu_kernels` chose it (`own_kernel`). Longer inference calls dequantize with the project's
        kernel (bitsandbytes' CPU dequantization is 12x slower on AVX2, and its AVX512 one gets shapes with in_features
        not a multiple of the block size wrong) and run `F.linear` in the compute dtype, as fp32 GEMMs where the CPU
        emulates that dtype's. Calls that need the input's gradient keep bitsandbytes' forward where it is right (it
        keeps the 4-bit weight for the backward, not the dense one). On other devices it is bitsandbytes' forward."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu":
                return super().forward(x)
            if not self.compute_type_is_set:
                self.set_compute_type(x)
                self.compute_type_is_set = True
            dtype = self.compute_dtype or x.dtype
            if getattr(self, "own_kernel", False) and _own_kernel_call(x):
                output = cpu_4bit_kernel.matmul(x.to(dtype), self.weight.data, self.weight.quant_state)
                return (output if self.bias is None else output + self.bias.to(dtype)).to(x.dtype)
            needs_grad = torch.is_grad_enabled() and x.requires_grad
            fast_dequantize = cpu_4bit_kernel.dequantizes(self.weight.quant_state) and cpu_4bit_kernel.available()
            if _bnb_dequantizes_exactly(self.weight.quant_state) and (needs_grad or not fast_dequantize):
                return super().forward(x)  # keeps the 4-bit weight, not the dense one, for the backward
            bias = None if self.bias is None else self.bias.to(dtype)
            if needs_grad:
                return F.linear(x.to(dtype), dequantize_weight(self.weight, dtype), bias).to(x.dtype)
            return _dequantized_linear(x.to(dtype), self.weight, bias).to(x.dtype)


_scratch = threading.local()


def inference_scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reused, uninitialised CPU tensor for the dense weights of an inference call (one per name, dtype and
    thread; it grows to the largest request and is kept). Each large allocation is freshly mapped memory, and on
    the machines measured touching its pages cost more than dequantizing into them (a 1408x2048 bf16 projection:
    ~2 ms of page faults, 0.2 ms of dequantization), so the 32-token forward of the 4-bit 16B spent most of its time
    in page faults. Never for calls whose autograd graph could keep the tensor."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    numel = math.prod(shape)
    buffer = buffers.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        buffers.pop((name, dtype), None)
        buffer = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def _dequantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T (+ bias)` in x's dtype for an inference call on CPU, the quantized weight dequantized into the thread's
    scratch; as an fp32 GEMM where the CPU emulates that dtype's GEMMs (the same products summed in fp32, rounded
    once: faster from `_UPCAST_MIN_ROWS` rows)."""
    rows = x.numel() // max(x.shape[-1], 1)
    upcast = _emulates_low_precision_matmul(x.dtype) and rows >= _UPCAST_MIN_ROWS
    dtype = torch.float32 if upcast else x.dtype
    shape = weight.quant_state.shape if isinstance(weight, bnb.nn.Params4bit) else weight.shape
    dense = dequantize_weight(weight, out=inference_scratch("linear", tuple(shape), dtype))
    if not upcast:
        return F.linear(x, dense, bias)
    return F.linear(x.float(), dense, None if bias is None else bias.float()).to(x.dtype)


def dequantize_weight(
    weight: torch.Tensor,
    dtype: torch.dtype | None = None,
    int8_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense [out, in] value of a bnb 4-bit (`Params4bit`) or 8-bit (`Int8Params`) weight; other tensors as they
    are. `int8_scale` is the row scale of an 8-bit weight whose `SCB` moved to its layer's state. With `out`, the
    value is written there (on GPUs, 4-bit weights are dequantized straight into it when the dtypes agree)."""
    dtype = out.dtype if out is not None else dtype
    if not is_quantized_weight(weight):
        dense = weight.detach()
    elif isinstance(weight, bnb.nn.Params4bit):
        data, quant_state = _plain_4bit(weight) if is_packed_for_cpu(weight) else (weight.data, weight.quant_state)
        if out is not None and out.dtype == quant_state.dtype and out.device.type != "cpu":
            return dequantize_4bit(data, quant_state, out=out)  # bitsandbytes has no CPU kernel for `out=`
        return _dequantize_4bit(data, quant_state, dtype, out)
    else:
        scale = weight.SCB if weight.SCB is not None else int8_scale
        if scale is None:
            raise ValueError("This 8-bit weight has lost its row scales (SCB); reload the model.")
        dense = int8_vectorwise_dequant(weight.data, scale)
    if out is not None:
        return out.copy_(dense)
    return dense if dtype is None else dense.to(dtype)


class DeepseekMoEExpertWeight(nn.Module):
    """One projection of one routed expert, `[out, in]`: the bnb weight (`Params4bit` or `Int8Params`) of the
    `Linear4bit` / `Linear8bitLt` it was loaded as, without the `nn.Linear` interface (its forward is never called:
    `DeepseekMoEQuantizedExperts` dequantizes it), and with the same state dict, so quantized checkpoints round-trip.
    A weight left unquantized (e.g. `llm_int8_skip_modules`) is kept as it is."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        state = getattr(linear, "state", None)
        if isinstance(self.weight, bnb.nn.Int8Params) and self.weight.SCB is None and state is not None:
            self.weight.SCB = state.SCB  # Linear8bitLt moves the scales to its state on its first forward
        # The CPU kernel of inference calls (`configure_4bit_cpu_kernels`): bitsandbytes' packed one, or the
        # project's own for calls of up to CPU_KERNEL_MAX_ROWS rows.
        self.packed_kernel, self.own_kernel = False, False

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_weight(self.weight, dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ weight.T` for an inference call on CPU: through bitsandbytes' packed kernel where this projection
        takes it (packing the weight on first use), or the own kernel for a few rows, else with the weight
        dequantized (`_dequantized_linear`)."""
        if self.own_kernel and _own_kernel_call(x):
            return cpu_4bit_kernel.matmul(x, self.weight.data, self.weight.quant_state)
        if not self.packed_kernel:
            return _dequantized_linear(x, self.weight)
        if not is_packed_for_cpu(self.weight):
            _pack_for_cpu(self.weight)
        return bnb.matmul_4bit(x, self.weight, self.weight.quant_state)

    def unpack(self) -> None:
        """Back to the plain layout (before a call that needs the dequantized weight, and before saving)."""
        _unpack_for_cpu(self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The keys bnb's Linear4bit / Linear8bitLt write, which transformers' bnb loading reads back.
        self.unpack()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.weight
        if isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None:
            for key, value in weight.quant_state.as_dict(packed=True).items():
                destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()
        elif isinstance(weight, bnb.nn.Int8Params) and weight.SCB is not None:
            destination[f"{prefix}SCB"] = weight.SCB if keep_vars else weight.SCB.detach()
            destination[f"{prefix}weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def extra_repr(self) -> str:
        kind = type(self.weight).__name__ if is_quantized_weight(self.weight) else str(self.weight.dtype)
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


class DeepseekMoEExpertProjections(nn.Module):
    """gate / up / down of one routed expert: `nn.Linear` while loading, `DeepseekMoEExpertWeight` afterwards."""

    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        hidden, width = config.hidden_size, config.moe_intermediate_size
        self.gate = nn.Linear(hidden, width, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)


class DeepseekMoEQuantizedExperts(nn.Module):
    """The routed experts of one MoE layer with bitsandbytes 4-bit / 8-bit weights, one `DeepseekMoEExpertProjections`
    per expert (submodules `"0"`, `"1"`, ...; `expert(j).gate/up/down`). Same call signature and output as
    `DeepseekMoEExperts`.

    The forward dequantizes into the fused layout (`gate_up_proj [E, 2I, H]`, gate rows first, `down_proj [E, H, I]`)
    and runs the model's experts implementation (`config._experts_implementation`) on it: on CPU only the experts hit
    are dequantized (a host sync, allowed there); elsewhere all of them, without a host sync (`grouped_mm` on CUDA).
    """

    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        for index in range(config.n_routed_experts):
            self.add_module(str(index), DeepseekMoEExpertProjections(config))
        self.config = config
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.act_fn = ACT2FN[config.hidden_act]
        self.compute_dtype: torch.dtype | None = None
        # Whether some projection takes bitsandbytes' packed CPU kernel / the own one (`configure_4bit_cpu_kernels`),
        # and whether some weight is packed now.
        self.packed_kernels, self.own_kernels, self._packed = False, False, False
        # What transformers' experts implementations read from an experts module (`@use_experts_implementation`).
        self.has_gate, self.has_bias, self.is_transposed, self.is_concatenated = True, False, False, True
        self.has_post_expert_norm, self._is_expert_parallel = False, False

    _apply_gate = _default_apply_gate

    def expert(self, index: int) -> DeepseekMoEExpertProjections:
        return self._modules[str(index)]

    def projections(self) -> Iterator[tuple[DeepseekMoEExpertProjections, str, nn.Module]]:
        for index in range(self.num_experts):
            expert = self.expert(index)
            for name in EXPERT_PROJECTIONS:
                yield expert, name, getattr(expert, name)

    def finalize(self, compute_dtype: torch.dtype) -> nn.Module:
        """After loading: keep the bnb weights as `DeepseekMoEExpertWeight`s and dequantize in `compute_dtype`. If no
        projection was quantized (skipped through `llm_int8_skip_modules`, CPU offload), return fused experts."""
        self.compute_dtype = compute_dtype
        modules = [module for _, _, module in self.projections()]
        if not any(is_bnb_linear(module) or isinstance(module, DeepseekMoEExpertWeight) for module in modules):
            return self.to_dense(compute_dtype)
        for expert, name, module in self.projections():
            if not isinstance(module, DeepseekMoEExpertWeight):
                setattr(expert, name, DeepseekMoEExpertWeight(module))
        return self

    @property
    def device(self) -> torch.device:
        return self.expert(0).gate.weight.device

    def dequantize(
        self, experts: list[int] | None = None, dtype: torch.dtype | None = None, scratch: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense `(gate_up_proj [E, 2I, H], down_proj [E, H, I])`. With `experts`, only those rows are written (the
        others are left uninitialised, and never read by the hit-only implementations). `scratch`: into the
        thread's reused CPU buffers (`inference_scratch`), for an inference call that lets them go when it returns."""
        dtype = dtype or self.compute_dtype or torch.get_default_dtype()
        width = self.intermediate_dim
        shapes = (self.num_experts, 2 * width, self.hidden_dim), (self.num_experts, self.hidden_dim, width)
        if scratch and self.device.type == "cpu":
            gate_up_proj = inference_scratch("experts.gate_up_proj", shapes[0], dtype)
            down_proj = inference_scratch("experts.down_proj", shapes[1], dtype)
        else:
            gate_up_proj = torch.empty(shapes[0], dtype=dtype, device=self.device)
            down_proj = torch.empty(shapes[1], dtype=dtype, device=self.device)
        for index in range(self.num_experts) if experts is None else experts:
            self._dequantize_expert_into(index, gate_up_proj[index], down_proj[index])
        return gate_up_proj, down_proj

    def dequantize_expert(self, index: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's dense `(gate_up [2I, H], down [H, I])` (e.g. for a LoRA layer over these experts)."""
        dtype = dtype or self.compute_dtype or torch.get_default_dtype()
        gate_up = torch.empty(2 * self.intermediate_dim, self.hidden_dim, dtype=dtype, device=self.device)
        down = torch.empty(self.hidden_dim, self.intermediate_dim, dtype=dtype, device=self.device)
        self._dequantize_expert_into(index, gate_up, down)
        return gate_up, down

    def _dequantize_expert_into(self, index: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        expert, width = self.expert(index), self.intermediate_dim
        _dequantize_into(expert.gate, gate_up[:width])
        _dequantize_into(expert.up, gate_up[width:])
        _dequantize_into(expert.down, down)

    def to_dense(self, dtype: torch.dtype | None = None) -> DeepseekMoEExperts:
        """Fused `DeepseekMoEExperts` holding the dequantized weights (what `dequantize_model` puts in its place)."""
        gate_up_proj, down_proj = self.dequantize(dtype=dtype)
        with torch.device("meta"):
            dense = DeepseekMoEExperts(self.config)
        dense.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        dense.down_proj = nn.Parameter(down_proj, requires_grad=False)
        return dense

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad)
        inference = not needs_grad and not self.training and hidden_states.device.type == "cpu"
        kernels = self.packed_kernels or self.own_kernels
        if kernels and inference and self.config._experts_implementation in HIT_ONLY_IMPLEMENTATIONS:
            return self._per_expert_forward(hidden_states, top_k_index, top_k_weights)
        self._unpack()
        if needs_grad:
            # The dense weights are 3.5x (4-bit) the stored ones: recompute them in the backward, don't keep them.
            return checkpoint(self._dense_forward, hidden_states, top_k_index, top_k_weights, use_reentrant=False)
        return self._dense_forward(hidden_states, top_k_index, top_k_weights, scratch=True)

    def _per_expert_forward(self, hidden_states, top_k_index, top_k_weights):
        """Inference on CPU with bitsandbytes' packed kernel or the own one (`DeepseekMoEExpertWeight.linear`): the
        per-expert loop of the eager implementation over the experts hit, without dequantizing the projections a
        kernel takes. An expert that gets few tokens (most of them in a prefill: 6 of 64 experts per token) takes
        the own kernel, the others are dequantized one at a time into reused memory."""
        newly_packed, self._packed = not self._packed, True
        dtype = self.compute_dtype or hidden_states.dtype
        output = torch.zeros_like(hidden_states)
        for index in torch.unique(top_k_index).tolist():
            token_idx, slot = torch.where(top_k_index == index)
            expert = self.expert(index)
            states = hidden_states[token_idx].to(dtype)
            expert_out = expert.down.linear(self.act_fn(expert.gate.linear(states)) * expert.up.linear(states))
            expert_out = expert_out * top_k_weights[token_idx, slot, None]
            if token_idx.numel() == output.shape[0]:  # every token (a 1-token decode step): rows in order
                output.add_(expert_out.to(output.dtype))
            else:  # int32 rows: int64 ones detour through a multi-threaded scatter_add_ (0.4-1.3 ms for one row)
                output.index_add_(0, token_idx.to(torch.int32), expert_out.to(output.dtype))
        if newly_packed:
            _return_freed_memory()
        return output

    def _unpack(self) -> None:
        if self._packed:
            for _, _, projection in self.projections():
                projection.unpack()
            self._packed = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._packed = False  # each projection unpacks itself for saving
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _dense_forward(self, hidden_states, top_k_index, top_k_weights, scratch=False):
        implementation = self.config._experts_implementation
        experts = None
        if hidden_states.device.type == "cpu" and implementation in HIT_ONLY_IMPLEMENTATIONS:
            experts = torch.unique(top_k_index).tolist()
        gate_up_proj, down_proj = self.dequantize(experts, scratch=scratch)
        experts_forward = ALL_EXPERTS_FUNCTIONS.get_interface(implementation, _EAGER_EXPERTS_FORWARD)
        dense_view = _DenseExpertsView(self, gate_up_proj, down_proj)
        return experts_forward(dense_view, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, compute_dtype={self.compute_dtype}"


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Give the heap's free memory back to the system (glibc). Repacking weights frees each plain copy after its
    packed one is allocated, and glibc keeps the holes: at the 16B's 4-bit size the first inference call left 3.4 GB
    of freed memory in the process, which this returns."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextmanager
def _returning_freed_memory(every_seconds: float):
    """`_return_freed_memory()` every `every_seconds` while the block runs (a quantizing load): each bf16 tensor read
    is freed once quantized, but glibc keeps the freed memory, and the 16B's 8-bit load was killed for memory at a
    third of the way (a 3-layer model at full width kept 5.9 GB for a 2.1 GB footprint; 2.4 GB after a trim)."""
    if _malloc_trim() is None:
        yield
        return
    import threading

    stop = threading.Event()

    def trim_until_stopped():
        while not stop.wait(every_seconds):
            _return_freed_memory()

    thread = threading.Thread(target=trim_until_stopped, name="return-freed-memory", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _return_freed_memory()


def _dequantize_into(module: nn.Module, out: torch.Tensor) -> None:
    # A `DeepseekMoEExpertWeight`, or the `nn.Linear` / bnb layer it is made from while loading.
    state = getattr(module, "state", None)
    dequantize_weight(module.weight, int8_scale=getattr(state, "SCB", None), out=out)


# The per-expert reference loop of `DeepseekMoEExperts` (experts implementation "eager"), without the dispatch.
_EAGER_EXPERTS_FORWARD = DeepseekMoEExperts.forward.__wrapped__


class _DenseExpertsView:
    """What an experts implementation reads as `self`: the quantized module's attributes with dense weights."""

    def __init__(self, experts: DeepseekMoEQuantizedExperts, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        self._experts = experts
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    def __getattr__(self, name):
        return getattr(self._experts, name)


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _swap_in_quantized_experts(parent: nn.Module, name: str, module: nn.Module) -> nn.Module | None:
    # A torch module-registration hook, active only while `quantized_experts_loading` is.
    if type(module) is DeepseekMoEExperts:
        return DeepseekMoEQuantizedExperts(module.config)
    return None


@contextmanager
def quantized_experts_loading(pretrained_model_name_or_path, kwargs: dict):
    """Context for `from_pretrained`: yields the keyword arguments to load with. With a bitsandbytes config (passed,
    or saved with the checkpoint) the models built inside get `DeepseekMoEQuantizedExperts`, and the released
    per-expert tensor names are mapped onto them (`key_mapping`); otherwise `kwargs` are yielded unchanged.
    Call `finalize_quantized_experts(model)` on the loaded model."""
    bnb_config = requested_bnb_config(pretrained_model_name_or_path, kwargs)
    if bnb_config is None:
        yield kwargs
        return
    require_bitsandbytes()
    bnb_cpu_quantize.register()  # the load's time is almost all 4-bit quantization: the faster, identical CPU kernel
    key_mapping = {**EXPERT_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
    # torch's hook is process-wide: a DeepseekMoEExperts built by another thread during this load is swapped too.
    handle = torch.nn.modules.module.register_module_module_registration_hook(_swap_in_quantized_experts)
    try:
        with _shards_read_without_mmap(), _returning_freed_memory(every_seconds=0.5):
            yield {**kwargs, "key_mapping": key_mapping}
    finally:
        handle.remove()


@contextmanager
def _shards_read_without_mmap():
    """Read the safetensors shards with `pread` instead of mmap while quantizing on load (the backend transformers
    itself picks on Windows and MPS). transformers keeps every shard mapped until the whole load ends, so each
    bf16 page read for quantization stays resident in the process: the 16B's 4-bit load peaked at its 9.8 GB
    footprint plus up to the 32.8 GB of mapped shards (what the machine's RAM allowed). With pread, a tensor's bytes
    live only until it is quantized."""
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if original is None:  # a transformers that opens shards elsewhere: nothing to change
        yield
        return

    def safe_open_with_pread(*args, **kwargs):
        if kwargs.get("backend", "mmap") == "mmap" and kwargs.get("device", "cpu") == "cpu":
            kwargs["backend"] = "pread"
        return original(*args, **kwargs)

    modeling_utils.safe_open = safe_open_with_pread
    try:
        yield
    finally:
        modeling_utils.safe_open = original


def finalize_quantized_experts(model: nn.Module) -> None:
    """After loading: turn each layer's loaded per-expert bnb layers into `DeepseekMoEExpertWeight`s (dequantized in
    the router's dtype, the model's compute dtype), or back into fused experts where nothing was quantized."""
    blocks = [
        block
        for block in model.modules()
        if isinstance(block, DeepseekMoESparseMoeBlock) and isinstance(block.experts, DeepseekMoEQuantizedExperts)
    ]
    for block in blocks:
        block.experts = block.experts.finalize(block.gate.weight.dtype)
    if blocks:
        _set_save_conversions(model)
        hf_quantizer = getattr(model, "hf_quantizer", None)
        if hf_quantizer is not None:
            # `model.dequantize()` (transformers) only knows bnb's Linear layers; make it dequantize the experts too.
            hf_quantizer._dequantize = lambda model, dtype=None: dequantize_model(model, dtype)
    configure_4bit_cpu_kernels(model)


def configure_4bit_cpu_kernels(model: nn.Module, packed: bool = True) -> None:
    """Choose the CPU kernel of each 4-bit weight of a loaded model (`Linear4bit` and routed experts) for inference
    calls: bitsandbytes' packed AVX512-BF16 kernel, the fastest, where the CPU has it and the shape fits
    (`packed_4bit_layout_fits`); elsewhere the project's own kernel for calls of a few rows (`cpu_4bit_kernel`)
    where it builds; else dequantize + matmul. `packed=False` turns both kernels off everywhere (results then
    equal those of the dequantized model bit for bit, on every CPU kind)."""
    if not is_bitsandbytes_available():
        return
    available = packed and packed_4bit_cpu_kernel_available()
    own_available = packed and not available and own_4bit_cpu_kernel_available()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            own = own_available and _takes_own_kernel(module.weight)
            _configure_linear4bit(module, available and _takes_packed_layout(module.weight), own)
        elif isinstance(module, DeepseekMoEQuantizedExperts):
            projections = [projection for _, _, projection in module.projections()]
            for projection in projections:
                if isinstance(projection, DeepseekMoEExpertWeight):
                    projection.packed_kernel = available and _takes_packed_layout(projection.weight)
                    projection.own_kernel = own_available and _takes_own_kernel(projection.weight)
                    projection.unpack()
            module.packed_kernels = any(getattr(projection, "packed_kernel", False) for projection in projections)
            module.own_kernels = any(getattr(projection, "own_kernel", False) for projection in projections)
            module._packed = False


def _set_save_conversions(model: nn.Module) -> None:
    """What `save_pretrained` reverses: the expert renamings used at load, plus the model's own expert fusion (for
    experts left unquantized). bitsandbytes' deserializing converters of a pre-quantized load are dropped: they have
    no reverse and a save needs none (the state dict already holds the serialized names)."""
    loaded = [
        conversion
        for conversion in getattr(model, "_weight_conversions", None) or []
        if not any(getattr(op, "hf_quantizer", None) for op in getattr(conversion, "operations", ()))
    ]
    model._weight_conversions = loaded + get_model_conversion_mapping(model, add_legacy=False)


# --------------------------------------------------------------------------------------------------------------------
# Dequantizing, merging QLoRA adapters, k-bit training


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes weight of a loaded 4-bit / 8-bit DeepSeekMoE by its dequantized value, in place:
    routed experts become fused `DeepseekMoEExperts`, `Linear4bit` / `Linear8bitLt` become `nn.Linear`. With `dtype`
    every parameter is cast to it. The result is a plain model that saves in the released layout.

    To merge a QLoRA adapter, use `merge_adapter_into_dequantized_model` (PEFT's own merge into a bnb layer
    re-quantizes the merged weight)."""
    if any(hasattr(module, "base_layer") for module in model.modules()):
        raise ValueError(
            "dequantize_model got a model with adapter layers: use merge_adapter_into_dequantized_model(peft_model) "
            "to merge them into the dequantized weights, or unload them first (peft_model.unload())."
        )
    target_dtype = dtype or _compute_dtype(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, DeepseekMoEQuantizedExperts):
            model.set_submodule(name, module.to_dense(target_dtype))
        elif is_bnb_linear(module):
            model.set_submodule(name, _dense_linear(module, target_dtype))
    _remove_router_hooks(model)
    _forget_quantization(model)
    if dtype is not None:
        _cast_parameters(model, dtype)
    return model


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    # Parameters only: `model.to(dtype)` would also round the fp32 RoPE `inv_freq` buffer.
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
    model.config.dtype = dtype


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model was loaded in, which its routers keep (`prepare_for_kbit_training` included)."""
    router = next((module for module in model.modules() if isinstance(module, DeepseekMoEGate)), None)
    if router is not None:
        return router.weight.dtype
    return model.get_input_embeddings().weight.dtype


def _dense_linear(module: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    state = getattr(module, "state", None)
    weight = dequantize_weight(module.weight, dtype, int8_scale=getattr(state, "SCB", None))
    with torch.device("meta"):
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        dense.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return dense


def _forget_quantization(model: nn.Module) -> None:
    hf_quantizer = getattr(model, "hf_quantizer", None)
    if hf_quantizer is not None:
        hf_quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, flag):
            setattr(model, flag, False)
    # The loading conversions were those of the quantized layout; saving must use the model's own (fusing) ones.
    model.__dict__.pop("_weight_conversions", None)


def merge_adapter_into_dequantized_model(peft_model, dtype: torch.dtype | None = torch.bfloat16) -> nn.Module:
    """Merge the active (Q)LoRA adapter of a PEFT model over a 4-bit / 8-bit DeepSeekMoE into the dequantized base
    weights, the weights the adapter was trained against, and return the plain merged model (in `dtype`), ready for
    `save_pretrained` in the released layout. The PEFT model is consumed."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter_name = peft_model.active_adapter
    adapter_config = copy.deepcopy(peft_model.peft_config[adapter_name])
    adapter_state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    adapter_state = {key: value.detach().clone() for key, value in adapter_state.items()}
    base = dequantize_model(peft_model.unload(), dtype)
    adapter_config.inference_mode = True
    restored = get_peft_model(base, adapter_config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(restored, adapter_state, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"The adapter weights did not all find their layer again: {result.unexpected_keys[:5]}")
    merged = restored.merge_and_unload()
    if dtype is not None:
        _cast_parameters(merged, dtype)
    return merged


def prepare_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """PEFT's `prepare_model_for_kbit_training` (frozen base, fp32 norms / embeddings / lm_head, gradient
    checkpointing), with the routers kept in the compute dtype: PEFT upcasts every non-4-bit parameter, and fp32
    activations would make the routers score in fp32, which picks different experts than the bf16 model on near-ties.
    Each router's weight goes back to its dtype and its input is cast to it, so routing is computed as at inference."""
    from peft import prepare_model_for_kbit_training

    routers = [module for module in model.modules() if isinstance(module, DeepseekMoEGate)]
    router_dtypes = [router.weight.dtype for router in routers]
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=use_gradient_checkpointing,
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
    )
    for router, dtype in zip(routers, router_dtypes):
        router.weight.data = router.weight.data.to(dtype)
        if getattr(router, "_router_dtype_hook", None) is None:
            router._router_dtype_hook = router.register_forward_pre_hook(_cast_router_input)
    return model


def _cast_router_input(router: DeepseekMoEGate, args: tuple):
    hidden_states, *rest = args
    return (hidden_states.to(router.weight.dtype), *rest)


def _remove_router_hooks(model: nn.Module) -> None:
    for module in model.modules():
        hook = getattr(module, "_router_dtype_hook", None)
        if hook is not None:
            hook.remove()
            module._router_dtype_hook = None


__all__ = [
    "DeepseekMoEExpertProjections",
    "DeepseekMoEExpertWeight",
    "DeepseekMoEQuantizedExperts",
    "configure_4bit_cpu_kernels",
    "cpu_4bit_kernel_path",
    "dequantize_model",
    "dequantize_weight",
    "describe_cpu_4bit_kernels",
    "finalize_quantized_experts",
    "is_packed_for_cpu",
    "is_prequantized",
    "merge_adapter_into_dequantized_model",
    "packed_4bit_cpu_kernel_available",
    "packed_4bit_layout_fits",
    "prepare_for_kbit_training",
    "quantized_experts_loading",
    "resolve_bnb_config",
]
