"""The routed-experts implementations added by this project, registered with transformers' experts interface.

`"sorted_loop"`: one sort of the (token, slot) pairs by expert, then per hit expert a gather, two matmuls and an
`index_add_` on small temporaries, with a custom backward that writes expert weight gradients straight into one buffer
per fused weight (the fastest path measured on CPU, see benchmarks/results/). `"auto"` (the model's default): the
fastest measured path on the device at hand, and a traceable one while `torch.compile` or `torch.export` trace it.

Neither calls the activation module: every rank then makes the same module calls whatever the routing (DeepSpeed
ZeRO-3 hooks every module and stops when ranks disagree).
"""

import functools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface, _can_use_grouped_mm, grouped_mm_experts_forward


# On CPUs that emulate low-precision GEMMs, a forward bf16/fp16 expert matmul (`x @ W.t()`) beats upcasting the
# expert's weight to fp32 below this many rows (measured at the 16B dims, AVX2, 2 threads: crossover between 8 and
# 16 rows). The backward always upcasts: there the emulated kernels are slower at any row count (`g @ W` with a
# row-major `W` by 6-40x, the weight-gradient GEMMs by 1.3-7x).
_UPCAST_MIN_ROWS = 8


@functools.cache
def _emulates_low_precision_matmul(dtype: torch.dtype) -> bool:
    """True for bf16/fp16 on x86 CPUs without bf16 (AVX512-BF16 / AMX) or fp16 (AMX-FP16) matmul instructions.

    There oneDNN emulates those GEMMs; an fp32 GEMM on upcast operands (exact products, the same fp32 accumulation,
    rounded back once) measured 5-40x faster for expert-sized matmuls. Other CPUs are not measured: left native.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    if dtype == torch.bfloat16:
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return not torch.cpu._is_amx_fp16_supported()


def activation_function(act_fn: Callable) -> Callable:
    """The function an activation module computes, called without the module's `__call__`, so no module hook fires
    a routing-dependent number of times (once per hit expert)."""
    if isinstance(act_fn, (nn.SiLU, SiLUActivation)):
        return F.silu
    if isinstance(act_fn, nn.Module):
        return act_fn.forward
    return act_fn


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, upcast: bool) -> None:
    """out = a @ b, computed in fp32 and rounded into `out` when `upcast`."""
    if upcast:
        out.copy_(torch.mm(a.float(), b.float()))
    else:
        torch.mm(a, b, out=out)


def _gated_activation(act_fn: Callable, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


def _gated_activation_backward(
    act_fn: Callable, gate_up: torch.Tensor, gate_act: torch.Tensor, grad_activated: torch.Tensor
) -> torch.Tensor:
    """Gradient of `act_fn(gate) * up` with respect to `gate_up` ([rows, 2I]), given `gate_act = act_fn(gate)`;
    closed form for SiLU (`act_fn` is `F.silu`), autograd through `act_fn` otherwise."""
    gate, up = gate_up.chunk(2, dim=-1)
    grad = torch.empty_like(gate_up)
    grad_gate, grad_up = grad.chunk(2, dim=-1)
    torch.mul(grad_activated, gate_act, out=grad_up)
    torch.mul(grad_activated, up, out=grad_gate)
    if act_fn is F.silu:
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
    else:
        with torch.enable_grad():
            gate = gate.detach().requires_grad_(True)
            grad_gate.copy_(torch.autograd.grad(act_fn(gate), gate, grad_gate)[0])
    return grad


class _RecycledGradientMemory:
    """Uninitialised gradient buffers for fused expert weights on CPU that reuse the memory of the weight's previous
    gradient once nothing else holds it (after `zero_grad(set_to_none=True)`).

    At the 16B dims a layer's two fused gradients take 1.1 GB in bf16. Memory that large is mapped anew by the C
    allocator on every step, and the first-touch page faults cost more than the GEMMs that fill it (AVX512-BF16 VM,
    1 thread, the 128 weight-gradient GEMMs of a 1024-token step: 0.34 s CPU into reused memory, 1.0-1.4 s into
    fresh). Per-expert gradients of separate modules are small enough for the allocator to recycle them itself, so
    without this the fused layout alone would pay it.

    The memory is reused only when its use count shows no other holder: a gradient still alive (accumulation into
    `.grad`, a reference kept anywhere, a view) gets a fresh buffer, which is not kept. The kept memory is released
    when the weight is freed or its experts run in eval mode.
    """

    def __init__(self):
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._watched: set[int] = set()

    def empty_like(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
            return torch.empty_like(weight)
        key, nbytes = id(weight), weight.numel() * weight.element_size()
        storage = self._storages.get(key)
        if storage is not None and torch._C._storage_Use_Count(storage._cdata) > 1:
            return torch.empty_like(weight)
        if storage is not None and storage.nbytes() == nbytes:
            return weight.new_empty(0).set_(storage, 0, weight.shape, weight.stride())
        if key not in self._watched:
            self._watched.add(key)
            weakref.finalize(weight, self._forget, key)
        buffer = torch.empty_like(weight)
        self._storages[key] = buffer.untyped_storage()
        return buffer

    def _forget(self, key: int) -> None:
        self._storages.pop(key, None)
        self._watched.discard(key)

    def holds(self, weight: torch.Tensor) -> bool:
        return id(weight) in self._storages

    def release(self, *weights: torch.Tensor) -> None:
        for weight in weights:
            self._storages.pop(id(weight), None)


_RECYCLED_GRADIENT_MEMORY = _RecycledGradientMemory()


def _expert_grad_buffer(weight: torch.Tensor, bounds: list[tuple[int, int, int]]) -> torch.Tensor:
    """A gradient buffer for a fused expert weight: uninitialised for the hit experts (the caller writes each of their
    slices whole), zero for the others."""
    grad = _RECYCLED_GRADIENT_MEMORY.empty_like(weight)
    hit = {expert for expert, _, _ in bounds}
    for expert in range(weight.shape[0]):
        if expert not in hit:
            grad[expert].zero_()
    return grad


class _SortedExpertsFunction(torch.autograd.Function):
    """The routed experts, one hit expert at a time over its (token, slot) rows (found by one sort by expert): gather
    the tokens, SwiGLU, scale by the routing weight, add back into the tokens.

    One autograd function, so that the backward writes each expert's weight gradient straight into one buffer per
    fused weight (no per-slice full-size gradients) and recomputes the activation instead of keeping it. Every
    temporary is per expert: on CPU, fresh pages for large temporaries cost more than the arithmetic on them, while
    small blocks are recycled by the allocator.
    """

    @staticmethod
    def forward(ctx, hidden_states, row_token, row_weight, gate_up_proj, down_proj, bounds, act_fn, keep_activations):
        dtype = gate_up_proj.dtype
        emulated = _emulates_low_precision_matmul(dtype) and hidden_states.device.type == "cpu"
        output = hidden_states.new_zeros(hidden_states.shape, dtype=dtype)
        expert_inputs, expert_gate_ups = [], []
        for expert, start, end in bounds:
            upcast = emulated and end - start >= _UPCAST_MIN_ROWS
            tokens = row_token[start:end]
            states = hidden_states.index_select(0, tokens).to(dtype)
            gate_up = states.new_empty(end - start, gate_up_proj.shape[1])
            _mm_into(gate_up, states, gate_up_proj[expert].t(), upcast)
            rows = states.new_empty(end - start, down_proj.shape[1])
            _mm_into(rows, _gated_activation(act_fn, gate_up), down_proj[expert].t(), upcast)
            # Rows are sorted by expert: each token's slots are added in increasing expert order, as in "eager".
            output.index_add_(0, tokens, rows.mul_(row_weight[start:end, None].to(dtype)))
            if keep_activations:  # otherwise freed at once, so the next expert reuses the same memory
                expert_inputs.append(states)
                expert_gate_ups.append(gate_up)
        ctx.save_for_backward(row_token, row_weight, gate_up_proj, down_proj, *expert_inputs, *expert_gate_ups)
        ctx.bounds, ctx.act_fn, ctx.emulated, ctx.hidden_dtype = bounds, act_fn, emulated, hidden_states.dtype
        return output.to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        row_token, row_weight, gate_up_proj, down_proj, *per_expert = ctx.saved_tensors
        bounds, emulated, dtype = ctx.bounds, ctx.emulated, gate_up_proj.dtype
        expert_inputs, expert_gate_ups = per_expert[: len(bounds)], per_expert[len(bounds) :]
        need_hidden, _, need_weight, need_gate_up, need_down = ctx.needs_input_grad[:5]
        grad_output = grad_output.to(dtype)
        grad_hidden = grad_output.new_zeros(grad_output.shape) if need_hidden else None
        grad_row_weight = torch.empty_like(row_weight) if need_weight else None
        grad_gate_up = _expert_grad_buffer(gate_up_proj, bounds) if need_gate_up else None
        grad_down = _expert_grad_buffer(down_proj, bounds) if need_down else None
        for (expert, start, end), states, gate_up in zip(bounds, expert_inputs, expert_gate_ups):
            tokens, weight = row_token[start:end], row_weight[start:end, None].to(dtype)
            grad_rows = grad_output.index_select(0, tokens)
            gate, up = gate_up.chunk(2, dim=-1)
            gate_act = ctx.act_fn(gate)
            activated = gate_act * up
            grad_activated = torch.empty_like(activated)
            _mm_into(grad_activated, grad_rows, down_proj[expert], emulated)
            if need_weight:  # d loss / d weight = <grad of the weighted row, unweighted row>
                grad_row_weight[start:end] = torch.linalg.vecdot(grad_activated, activated)
            grad_activated.mul_(weight)
            if need_down:
                _mm_into(grad_down[expert], grad_rows.mul_(weight).t(), activated, emulated)
            grad_gate_up_rows = _gated_activation_backward(ctx.act_fn, gate_up, gate_act, grad_activated)
            if need_gate_up:
                _mm_into(grad_gate_up[expert], grad_gate_up_rows.t(), states, emulated)
            if need_hidden:
                grad_states = torch.empty_like(states)
                _mm_into(grad_states, grad_gate_up_rows, gate_up_proj[expert], emulated)
                grad_hidden.index_add_(0, tokens, grad_states)
        if need_hidden:
            grad_hidden = grad_hidden.to(ctx.hidden_dtype)
        return grad_hidden, None, grad_row_weight, grad_gate_up, grad_down, None, None, None


def hit_expert_bounds(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert with rows, for rows sorted by expert with `counts` per expert."""
    bounds, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            bounds.append((expert, start, start + count))
        start += count
    return bounds


def sorted_loop_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts implementation `"sorted_loop"`: sort the (token, slot) pairs by expert, one matmul per hit expert.

    The fastest path measured on CPU (see benchmarks/). It reads the per-expert counts on the host once per layer,
    so on CUDA and while compiling `grouped_mm` is used instead (see `auto_experts_forward`).
    """
    top_k = top_k_index.shape[-1]
    flat_experts = top_k_index.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    bounds = hit_expert_bounds(torch.bincount(flat_experts, minlength=self.num_experts).tolist())
    row_weight = top_k_weights.reshape(-1)[order]
    # int32 row indices: with int64 ones, CPU `index_add_` detours through `scatter_add_`, whose multi-threaded
    # kernel stalls for tens of ms per call when another process holds a core (measured, 2 threads on 2 cores).
    row_token = (order // top_k).to(torch.int32)
    if not self.training:
        _RECYCLED_GRADIENT_MEMORY.release(self.gate_up_proj, self.down_proj)
    return _SortedExpertsFunction.apply(
        hidden_states,
        row_token,
        row_weight,
        self.gate_up_proj,
        self.down_proj,
        bounds,
        activation_function(self.act_fn),
        torch.is_grad_enabled(),
    )


def auto_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Experts implementation `"auto"` (the default): the fastest measured path per device, `grouped_mm` on GPUs that
    support it (no host sync, CUDA-graph and compile friendly), `sorted_loop` elsewhere. While `torch.compile` or
    `torch.export` trace the model, `grouped_mm` on every device: `sorted_loop` reads the per-expert counts on the
    host, which a full graph cannot."""
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if tracing or (
        hidden_states.device.type == "cuda" and _can_use_grouped_mm(hidden_states, self.gate_up_proj, top_k_index)
    ):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return sorted_loop_experts_forward(self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register("sorted_loop", sorted_loop_experts_forward)
ExpertsInterface.register("auto", auto_experts_forward)
