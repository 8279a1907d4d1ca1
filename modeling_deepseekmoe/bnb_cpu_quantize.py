"""A faster CPU kernel for bitsandbytes' `quantize_4bit` that gives bit-identical results.

bitsandbytes 0.50 has no native CPU kernel for 4-bit quantization. Its torch-op fallback spends half of its time in
`torch.bucketize`, and the rest in out-of-place temporaries. Quantizing a 16B model's weights as they load takes
about 100 ms per 1408x2048 expert projection there, and that is almost all of the 4-bit load time (profile in
`benchmarks/results/full_size_cpu.md`).

This kernel computes the same thing in fewer passes. The block absmax and the scaled values are computed with the
same fp32 operations in the same order: multiply by the reciprocal of the clamped absmax, then clamp to [-1, 1], with
the last partial block divided. The bucket of each value is then found with a lookup table over a uniform grid of
[-1, 1], followed by one comparison against the single code midpoint that lies in the value's grid cell. The grid is
chosen so that every midpoint lies far (in fp32 terms) from the edges of its cell, so a value's cell is never in doubt
where it matters. The result, packed codes and absmax, equals the fallback's bit for bit; tests compare both on
random, edge and all-zero inputs.

`register()` installs the kernel for CPU tensors through `torch.library` (the way bitsandbytes registers its
per-device kernels), unless the installed bitsandbytes already has a CPU kernel for the op.
"""

from concurrent.futures import ThreadPoolExecutor

import torch


_OP = "bitsandbytes::quantize_4bit"
_GRID_SIZES = (4096, 4093, 4099, 8191)  # tried in turn until every midpoint is clear of its cell's edges
_EDGE_CLEARANCE = 1e-5  # in units of scaled values (in [-1, 1]): far above the ~1e-7 error of the cell index
_tables: dict[str, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_registered = False


def _code_values(quant_type: str) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(quant_type, device="cpu").float()


def _lookup_tables(quant_type: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grid size G, below[G] = midpoints below the cell, threshold[G] = the midpoint inside the cell or +inf,
    order = code index of each sorted bucket)."""
    if quant_type in _tables:
        return _tables[quant_type]
    code = _code_values(quant_type)
    order = torch.argsort(code)
    midpoints = ((code[order[:-1]] + code[order[1:]]) / 2).double()
    for grid in _GRID_SIZES:
        edges = torch.arange(grid + 1, dtype=torch.float64) * (2.0 / grid) - 1.0
        cell = torch.floor((midpoints + 1.0) * (grid / 2.0)).long()
        clear = torch.minimum(midpoints - edges[cell], edges[cell + 1] - midpoints).min() > _EDGE_CLEARANCE
        if clear and torch.unique(cell).numel() == cell.numel():
            break
    else:  # pragma: no cover - the code tables are fixed; a new one that fits no grid fails loudly here
        raise RuntimeError(f"no lookup grid separates the {quant_type} code midpoints")
    below = torch.searchsorted(midpoints, edges[:-1], right=False).to(torch.uint8)  # midpoints < cell start
    threshold = torch.full((grid,), float("inf"), dtype=torch.float32)
    threshold[cell] = (code[order[:-1]] + code[order[1:]]) / 2  # the fp32 midpoints the fallback compares with
    _tables[quant_type] = (grid, below, threshold, order.to(torch.uint8))
    return _tables[quant_type]


# Values per pass: the work buffers stay in the L2 cache, no large temporary is allocated, and each op stays below
# torch's parallel grain size (32768), so it runs in the calling thread; the chunks are spread over torch's thread
# count of Python threads instead (torch releases the GIL in its ops), which measured faster than intra-op threads
# for ops this small, and much faster when the cores are shared with other processes.
_CHUNK = 1 << 15
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


class _Workspace:
    """Reused buffers for one chunk (fresh multi-MB temporaries cost more in page faults than the arithmetic)."""

    def __init__(self, size: int, blocksize: int):
        self.values = torch.empty(size)
        self.low, self.high = torch.empty(size // blocksize), torch.empty(size // blocksize)
        self.scale = torch.empty(size // blocksize)
        self.position = torch.empty(size)
        self.cell = torch.empty(size, dtype=torch.int32)
        self.threshold = torch.empty(size)
        self.above = torch.empty(size, dtype=torch.bool)
        self.bucket = torch.empty(size, dtype=torch.uint8)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, work: _Workspace, blocksize: int) -> None:
    """absmax of each block of `values` into `absmax`, and `values` scaled in place as the fallback scales them."""
    blocks = values.view(-1, blocksize)
    count = blocks.shape[0]
    low, high = torch.aminmax(blocks, dim=-1, out=(work.low[:count], work.high[:count]))
    torch.maximum(low.neg_(), high, out=absmax)
    scale = torch.clamp(absmax, min=1e-38, out=work.scale[:count]).reciprocal_()
    blocks.mul_(scale.unsqueeze(1)).clamp_(-1, 1)


def _bucket_into(scaled: torch.Tensor, quant_type: str, work: _Workspace) -> torch.Tensor:
    """Index of each value's code (uint8): the number of code midpoints strictly below it, mapped to the code."""
    grid, below, threshold, order = _lookup_tables(quant_type)
    size = scaled.numel()
    position = torch.add(scaled, 1.0, out=work.position[:size]).mul_(grid / 2.0)
    cell = work.cell[:size]
    cell.copy_(position).clamp_(0, grid - 1)  # truncation = floor: positions are >= 0
    bucket = torch.index_select(below, 0, cell, out=work.bucket[:size])
    thresholds = torch.index_select(threshold, 0, cell, out=work.threshold[:size])
    bucket.add_(torch.gt(scaled, thresholds, out=work.above[:size]))
    if quant_type != "nf4":
        torch.index_select(order, 0, bucket.to(torch.int32), out=bucket)
    return bucket


def quantize_4bit_cpu(
    A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same inputs and outputs as bitsandbytes' `quantize_4bit` op: packed codes `[ceil(n / 2), 1]` and the fp32
    absmax per block."""
    flat = A.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    chunk = max(blocksize, _CHUNK - _CHUNK % blocksize)
    blocks = -(-n // blocksize)
    absmax = torch.empty(blocks)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)

    def quantize_range(first: int, last: int) -> None:
        work = _Workspace(chunk, blocksize)
        for start in range(first, last, chunk):
            stop = min(start + chunk, last)
            values = work.values[: stop - start]
            values.copy_(flat[start:stop])
            _scale_blocks(values, absmax[start // blocksize : stop // blocksize], work, blocksize)
            pairs = _bucket_into(values, quant_type, work).view(-1, 2)
            torch.bitwise_left_shift(pairs[:, 0], 4, out=packed[start // 2 : stop // 2]).bitwise_or_(pairs[:, 1])

    chunks = -(-full // chunk)
    workers = max(1, min(torch.get_num_threads(), chunks))
    if workers == 1:
        quantize_range(0, full)
    else:
        global _pool, _pool_size
        if _pool is None or _pool_size < workers:
            _pool, _pool_size = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quantize_4bit"), workers
        per_worker = -(-chunks // workers) * chunk
        ranges = [(first, min(first + per_worker, full)) for first in range(0, full, per_worker)]
        for future in [_pool.submit(quantize_range, first, last) for first, last in ranges]:
            future.result()
    if full < n:  # the last, partial block: divided, as the fallback does
        tail = flat[full:].float()
        tail_max = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = tail_max
        scaled = torch.clamp(tail / tail_max, -1, 1)
        if scaled.numel() % 2:
            scaled = torch.cat([scaled, torch.zeros(1)])  # the fallback pads the scaled values with a zero
        pairs = _bucket_into(scaled, quant_type, _Workspace(scaled.numel(), blocksize)).view(-1, 2)
        packed[full // 2 :] = (pairs[:, 0] << 4) | pairs[:, 1]
    packed = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


def _cpu_kernel(A, blocksize, quant_type, quant_storage):
    return quantize_4bit_cpu(A, blocksize, quant_type, quant_storage)  # looked up per call (tests spy on it)


def _bitsandbytes_has_cpu_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "CPU")


def register() -> bool:
    """Install `quantize_4bit_cpu` as bitsandbytes' CPU kernel of `quantize_4bit` (once); False if bitsandbytes
    has its own CPU kernel, which is then kept."""
    global _registered
    if _registered:
        return True
    import bitsandbytes  # noqa: F401  (defines the op)

    if _bitsandbytes_has_cpu_kernel():
        return False
    torch.library.register_kernel(_OP, "cpu", _cpu_kernel)
    _registered = True
    return True
