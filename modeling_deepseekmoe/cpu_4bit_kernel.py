"""The project's CPU kernel for a few rows times a bitsandbytes 4-bit weight (`csrc/gemv_4bit.c`).

A decode step of the 4-bit model is ~660 products of one token with a 4-bit matrix. bitsandbytes' CPU paths for it
either dequantize the whole matrix first (every CPU) or run a packed bf16 kernel (AVX512-BF16 CPUs only) that reads
its 4-bit data at 3-4 GB/s, far below the memory bandwidth that bounds the step. This kernel reads the 4-bit codes
in bitsandbytes' own layout (no repacking, no second copy) and turns each quantization block into a 16-entry table
of the values the dequantized weight holds, so its products equal the dequantized weight's in fp32 arithmetic.

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
_ROUNDING = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 0}
_f32, _i64, _u8 = ctypes.POINTER(ctypes.c_float), ctypes.c_int64, ctypes.POINTER(ctypes.c_uint8)
_u16 = ctypes.POINTER(ctypes.c_uint16)


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
    library.gemv_4bit.argtypes = [
        _f32, _i64, _i64, _i64, _u8, _i64, _f32, ctypes.c_int, _f32, _u8, _f32, _f32, _i64, ctypes.c_float, _f32,
        ctypes.c_int,
    ]
    library.gemv_4bit_bf16.restype = ctypes.c_int
    library.gemv_4bit_bf16.argtypes = [
        _u16, _i64, _i64, _i64, _u8, _i64, _f32, _f32, _u8, _f32, _f32, _i64, ctypes.c_float, _f32, ctypes.c_int,
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
    return blocksize % 32 == 0 and in_features % blocksize == 0 and state.dtype in _ROUNDING


def _pointer(tensor: torch.Tensor, kind):
    return ctypes.cast(tensor.data_ptr(), kind)


def matmul(x: torch.Tensor, data: torch.Tensor, state, isa: str | None = None) -> torch.Tensor:
    """`x @ W.T` for the 4-bit weight `(data, state)` in bitsandbytes' plain layout (`fits(state)`), in x's dtype;
    x is [..., in_features] on the CPU. The products are those of the weight dequantized as `dequantize_weight(W,
    x.dtype)` holds it (rounded to `state.dtype`, and to bf16 for a bf16 x), summed in fp32."""
    isa = isa or native_isa()
    library = load(isa)
    out_features, in_features = state.shape
    if state.nested:
        code2 = state.state2.code.to(torch.float32).contiguous()
        absmax2 = state.state2.absmax.to(torch.float32).contiguous()
        keep = (state.absmax, code2, absmax2)
        scales = (None, _pointer(state.absmax, _u8), _pointer(code2, _f32), _pointer(absmax2, _f32))
        scales += (state.state2.blocksize, float(state.offset))
    else:
        absmax = state.absmax.to(torch.float32).contiguous()
        keep = (absmax,)
        scales = (_pointer(absmax, _f32), None, None, None, 1, 0.0)
    code = state.code.to(torch.float32).contiguous()
    bf16 = x.dtype == torch.bfloat16 and state.dtype != torch.float16 and state.blocksize % 64 == 0
    rows = x.reshape(-1, in_features)
    y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    status = 2
    if bf16 and isa == "avx512_bf16":
        rows = rows.contiguous()
        status = library.gemv_4bit_bf16(
            _pointer(rows, _u16), rows.shape[0], in_features, out_features, _pointer(data, _u8), state.blocksize,
            _pointer(code, _f32), *scales, _pointer(y, _f32), torch.get_num_threads(),
        )
    if status == 2:
        rounding = _ROUNDING[torch.bfloat16] if x.dtype == torch.bfloat16 else _ROUNDING[state.dtype]
        rows = rows.to(torch.float32).contiguous()
        status = library.gemv_4bit(
            _pointer(rows, _f32), rows.shape[0], in_features, out_features, _pointer(data, _u8), state.blocksize,
            _pointer(code, _f32), rounding, *scales, _pointer(y, _f32), torch.get_num_threads(),
        )
    del keep
    if status != 0:
        raise MemoryError("the CPU 4-bit kernel could not allocate its scratch memory")
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
