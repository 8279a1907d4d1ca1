"""The project's CPU kernels for bitsandbytes 4-bit weights (`csrc/gemv_4bit.c`): a few rows times the weight, and its
dequantization.

A decode step of the 4-bit model is ~660 products of one token with a 4-bit matrix. bitsandbytes' CPU paths for it
either dequantize the whole matrix first (every CPU) or run a packed bf16 kernel (AVX512-BF16 CPUs only) that reads
its 4-bit data at 3-4 GB/s, far below the memory bandwidth that bounds the step. This kernel reads the 4-bit codes
in bitsandbytes' own layout (no repacking, no second copy) and turns each quantization block into a 16-entry table
of the values the dequantized weight holds, so its products equal the dequantized weight's in fp32 arithmetic. The
same tables dequantize a whole weight (`dequantize`), bit-equal to bitsandbytes' `dequantize_4bit` and 12x faster
than its CPU version on AVX2 (measured there only), for calls with more rows than the product kernel pays off for.

It is C, built at first use with the system's C compiler (`CC`, else `cc`) for the vector ISA torch reports for this
CPU (AVX512, AVX2, else portable C), cached under `~/.cache/deepseekmoe/kernels` (`DEEPSEEKMOE_KERNEL_CACHE`), and
called through ctypes; its OpenMP threads are those of the runtime torch loads. Where it cannot be built (no
compiler) the 4-bit layers keep bitsandbytes' paths, and `deepseekmoe env` says so. `DEEPSEEKMOE_CPU_4BIT_KERNEL=0`
turns it off.
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "gemv_4bit.c"
ISA_FLAGS = {
    "avx512_bf16": ["-DGEMV4_AVX512_BF16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mf16c"],
    "avx512": ["-DGEMV4_AVX512", "-mavx512f", "-mfma", "-mf16c"],
    "avx2": ["-DGEMV4_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "portable": [],
}
# The C side's DTYPE_* / ROUND_* codes (the same numbers).
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def native_isa() -> str:
    """The variant this CPU runs: torch's CPU capability (which `ATEN_CPU_CAPABILITY` can lower) on x86."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"
    if capability == "AVX2":
        return "avx2"
    return "portable"


def cache_dir() -> Path:
    if os.environ.get("DEEPSEEKMOE_KERNEL_CACHE"):
        return Path(os.environ["DEEPSEEKMOE_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepseekmoe" / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


class KernelUnavailable(RuntimeError):
    pass


@functools.cache
def load(isa: str | None = None) -> ctypes.CDLL:
    """The built kernel for `isa` (default: this CPU's), building it on first use; `KernelUnavailable` says why not."""
    isa = isa or native_isa()
    source = SOURCE.read_bytes()
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailable("no C compiler found (install gcc, or set CC)")
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-std=gnu11", *ISA_FLAGS[isa]]
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"gemv_4bit-{isa}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run(
                [compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise KernelUnavailable(f"{compiler} could not build {SOURCE.name}: {result.stderr.strip()[-500:]}")
            os.chmod(built, 0o755)
            os.replace(built, target)  # atomic: a concurrent build or an interrupted one never leaves half a file
    library = ctypes.CDLL(str(target))
    library.gemv_4bit.restype = ctypes.c_int
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.gemv_4bit.argtypes = [
        pointer, ctypes.c_int, i64, i64, i64, pointer, i64, pointer, ctypes.c_int, pointer, pointer, pointer, pointer,
        i64, ctypes.c_float, pointer, ctypes.c_int,
    ]
    library.dequantize_4bit.restype = ctypes.c_int
    library.dequantize_4bit.argtypes = [
        pointer, i64, i64, pointer, ctypes.c_int, pointer, pointer, pointer, pointer, i64, ctypes.c_float, pointer,
        ctypes.c_int, ctypes.c_int,
    ]
    library.gemv_4bit_isa.restype = ctypes.c_char_p
    return library


def switched_off(variable: str) -> bool:
    """Whether an on/off environment switch (`DEEPSEEKMOE_CPU_4BIT_KERNEL`, `DEEPSEEKMOE_BNB_PACKED_KERNEL`) is off."""
    return os.environ.get(variable, "1").lower() in ("0", "false", "off")


def unavailable_reason() -> str | None:
    """Why this CPU's variant cannot serve (building it now if needed), or None where it can."""
    if switched_off("DEEPSEEKMOE_CPU_4BIT_KERNEL"):
        return "turned off by DEEPSEEKMOE_CPU_4BIT_KERNEL"
    try:
        load()
    except (KernelUnavailable, OSError) as error:
        return str(error)
    return None


@functools.cache
def available() -> bool:
    """Whether this CPU's variant is built; where it cannot be (not switched off), the reason is logged once."""
    reason = unavailable_reason()
    if reason is not None and not switched_off("DEEPSEEKMOE_CPU_4BIT_KERNEL"):
        logger.warning("deepseekmoe's CPU 4-bit kernel is unavailable (%s); 4-bit layers use bitsandbytes' paths",
                       reason)  # fmt: skip
    return reason is None


def fits(state) -> bool:
    """Whether the kernel takes a weight with this bitsandbytes quant state: 2-D, blocks within rows, 16 codes."""
    if state is None or len(state.shape) != 2 or state.code.numel() != 16:
        return False
    in_features, blocksize = state.shape[1], state.blocksize
    return blocksize % 32 == 0 and in_features % blocksize == 0 and state.dtype in _DTYPES


def _scale_arguments(state) -> tuple:
    """The C arguments of a quant state's scales and code table, kept on the state: a decode step calls the kernel
    ~700 times, and converting them each time cost more than some of the calls. Rebuilt if a tensor moved."""
    cached = getattr(state, "_deepseekmoe_kernel_arguments", None)
    current = (state.absmax.data_ptr(), state.code.data_ptr(), state.state2.absmax.data_ptr() if state.nested else 0)
    if cached is not None and cached[0] == current:
        return cached[2]
    code = state.code.to(torch.float32).contiguous()
    if state.nested:
        code2 = state.state2.code.to(torch.float32).contiguous()
        absmax2 = state.state2.absmax.to(torch.float32).contiguous()
        keep = (state.absmax, state.code, state.state2.absmax, state.state2.code, code, code2, absmax2)
        scales = (None, state.absmax.data_ptr(), code2.data_ptr(), absmax2.data_ptr(), state.state2.blocksize,
                  float(state.offset))  # fmt: skip
    else:
        absmax = state.absmax.to(torch.float32).contiguous()
        keep = (state.absmax, state.code, code, absmax)
        scales = (absmax.data_ptr(), None, None, None, 1, 0.0)
    arguments = (state.blocksize, code.data_ptr(), scales)
    # `keep` holds the tensors the pointers address, and the state's own ones: their addresses cannot be reused.
    state._deepseekmoe_kernel_arguments = (current, keep, arguments)
    return arguments


def matmul(x: torch.Tensor, data: torch.Tensor, state, isa: str | None = None) -> torch.Tensor:
    """`x @ W.T` for the 4-bit weight `(data, state)` in bitsandbytes' plain layout (`fits(state)`), in x's dtype;
    x is [..., in_features] on the CPU. The products are those of the weight dequantized as `dequantize_weight(W,
    x.dtype)` holds it (rounded to `state.dtype`, and to bf16 for a bf16 x), summed in fp32."""
    library = load(isa or native_isa())
    out_features, in_features = state.shape
    blocksize, code, scales = _scale_arguments(state)
    dtype = x.dtype if x.dtype in _DTYPES else torch.float32
    rounding = _DTYPES[torch.bfloat16] if dtype == torch.bfloat16 else _DTYPES[state.dtype]
    rows = x if x.dim() == 2 else x.reshape(-1, in_features)
    rows = rows.to(dtype).contiguous()
    y = torch.empty(rows.shape[0], out_features, dtype=dtype)
    status = library.gemv_4bit(
        rows.data_ptr(), _DTYPES[dtype], rows.shape[0], in_features, out_features, data.data_ptr(), blocksize, code,
        rounding, *scales, y.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the CPU 4-bit kernel could not allocate its scratch memory")
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def dequantizes(state) -> bool:
    """Whether `dequantize` takes a weight with this quant state (any shape: its blocks may span rows)."""
    return state is not None and state.code.numel() == 16 and state.blocksize % 2 == 0 and state.dtype in _DTYPES


def dequantize(
    data: torch.Tensor, state, dtype: torch.dtype | None = None, out: torch.Tensor | None = None, isa: str | None = None
) -> torch.Tensor:
    """The 4-bit weight `(data, state)` (`dequantizes(state)`) dense in `state.shape`: the values bitsandbytes'
    `dequantize_4bit` returns, converted to `dtype` (default `state.dtype`; `out`'s if given, written there), equal
    to the bit. Fast (one 16-entry table per block) where bitsandbytes' CPU dequantization is not."""
    library = load(isa or native_isa())
    blocksize, code, scales = _scale_arguments(state)
    if out is None or not out.is_contiguous() or out.dtype not in _DTYPES or out.numel() != state.shape.numel():
        target = torch.empty(state.shape, dtype=(out.dtype if out is not None else dtype) or state.dtype)
    else:
        target = out
    data = data.contiguous()
    library.dequantize_4bit(
        data.data_ptr(), target.numel(), blocksize, code, _DTYPES[state.dtype], *scales, target.data_ptr(),
        _DTYPES[target.dtype], torch.get_num_threads(),
    )
    if out is not None and target is not out:
        return out.copy_(target.view(out.shape))
    return target if out is None else out
