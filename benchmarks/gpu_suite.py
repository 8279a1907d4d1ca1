#!/usr/bin/env python
"""The GPU readiness suite: every GPU figure the project needs, as ONE prepared run of at most ~9 minutes on one
H100 / H200 with random weights created on that machine (no hub), written to `benchmarks/results/`.

Runner (a lent GPU machine has no registry, torch 2.11 + transformers 5.17 and no trl / datasets / bitsandbytes):

1. Here, once, in the repository root (the wheels are ~58 MB; the whole call may carry 64 MiB, so drop
   bitsandbytes==0.50.2 (41 MB) if the tree has grown: the 4-bit rows and QLoRA then skip with a note):

       echo /.whl/ >> .git/info/exclude
       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
         --platform manylinux2014_x86_64 -d .whl transformers==5.23.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 \
         dill==0.4.1 multiprocess==0.70.19 regex==2026.11.19 bitsandbytes==0.50.2

2. Check it on CPU first (seconds): `python benchmarks/gpu_suite.py --tiny --device cpu --output_dir /tmp/gs`.

3. One device `run` with carry [".whl"] and timeout_s 600, this command:

       python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python3 benchmarks/gpu_suite.py --output_dir $OUT 2>&1 | tee $OUT/gpu_suite.log

   It writes $OUT/gpu_suite_<gpu>.json and .md (and the log); copy the two into benchmarks/results/.
   Figures are written after every stage, so a run cut short still returns what it measured.

Stages (each timed, each isolated in its own process on a GPU so that a crash, a CUDA error or a hang costs only
that stage; each gets its share of `--budget_s` plus whatever the stages before it left unused, and a stage whose
time is gone is skipped with a note):

- calibration: a bf16 8192^3 matmul (TFLOP/s) and a 4 GiB device copy (TB/s), next to the datasheet figures.
- moe_block: one MoE block at the 16B dims, 16k tokens, bf16: our experts implementations ("auto" = grouped_mm on
  CUDA) vs the released algorithm (`reference_moe.py`), forward and forward+backward, model TFLOP/s vs the peak.
- decode_bf16: batch-1 greedy decode of the full 16B shape (random bf16 weights built on the GPU, 32.75 GB),
  eager with the default DynamicCache, tokens/s vs the bound HBM bandwidth / activated bytes per token.
- quantized: a random released-layout checkpoint at full width and `--reduced_layers` depth written to local disk
  with the project's writer, loaded through `from_pretrained(quantization_config=BitsAndBytesConfig(...))` in bf16,
  nf4 and nf4 + double quant: load time, weight bytes, peak GPU memory, decode tokens/s; extrapolated to 28 layers
  from the measured per-MoE-layer bytes and per-MoE-layer decode time (stated as estimates).
- train: LoRA and QLoRA SFT steps (`train_step.py`'s path: TRL trainer, PEFT, gradient checkpointing) on that
  reduced-depth checkpoint: step time, tokens/s, peak memory.
- esft_memory: trainable parameters, gradient and AdamW state bytes and peak memory of a training step for ESFT
  (`--esft_experts_per_layer` experts per MoE layer) vs full fine-tuning, measured at reduced depth and computed for
  the full 16B.
- decode_compiled: the decode of decode_bf16 with StaticCache + torch.compile (transformers' generate compiles the
  decode step); last because compiling the 16B may take minutes, so it gets whatever time is left.

Examples:
    python benchmarks/gpu_suite.py                                    # on the GPU machine (see Runner)
    python benchmarks/gpu_suite.py --tiny --device cpu --output_dir /tmp/gs   # every stage at toy dims, seconds
    python benchmarks/gpu_suite.py --stages moe_block decode_bf16 --peak_tflops 790 --bandwidth_tb_s 4.3
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property, partial
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_BUDGET_S = 540.0

# Datasheet figures (dense bf16 tensor-core TFLOP/s, HBM TB/s); the first row whose words all occur in
# torch.cuda.get_device_name() wins. GH200 comes in two memory variants, so its bandwidth must be given.
DEVICE_SPECS = (
    (("GH200",), 989.0, None),
    (("H200",), 989.0, 4.8),
    (("H100", "PCIE"), 756.0, 2.0),
    (("H100", "NVL"), 835.0, 3.9),
    (("H100",), 989.0, 3.35),  # SXM (HBM3)
)

# Toy dims for --tiny: every projection a multiple of 32 and at least 64 wide, so bitsandbytes' packed CPU 4-bit
# kernel (AVX512-BF16 machines) accepts them like the released dims.
# The vocabulary covers the 512-token tokenizer the train stage's trainer is given (train_step.py).
TINY_DIMS = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, num_attention_heads=2, num_key_value_heads=2,
    max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
)  # fmt: skip
TINY_FULL_LAYERS, TINY_REDUCED_LAYERS = 3, 2


# --- measuring ----------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rounded(value: float | None, digits: int = 4) -> float | None:
    """`value` to `digits` significant digits (so figures of toy runs stay visible too)."""
    return None if value is None else float(f"{value:.{digits}g}")


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> list[float]:
    """Seconds per call: CUDA events around each call on a GPU (one host sync at the end), wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in pairs]
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


class MemoryStats:
    """The CUDA caching allocator's current and peak allocation in GB (10^9 bytes); None off a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def release(self) -> None:
        """Free cached blocks and restart the peak, so the next peak belongs to what follows."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def allocated_gb(self) -> float | None:
        return rounded(torch.cuda.memory_allocated() / 1e9) if self.cuda else None

    def peak_gb(self) -> float | None:
        return rounded(torch.cuda.max_memory_allocated() / 1e9) if self.cuda else None


class LayerTimer:
    """Seconds spent in each decoder layer during 1-token decode steps, from forward hooks: CUDA events on a GPU
    (no sync inside the step, read once at the end), wall clock elsewhere. Prefill calls are not counted."""

    def __init__(self, layers, device: torch.device):
        self.device, self.active = device, False
        self.spans: dict[int, list] = {index: [] for index in range(len(layers))}
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._opener(index), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._closer(index)))

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _opener(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.active and hidden.shape[1] == 1:
                self.spans[index].append([self._mark(), None])

        return hook

    def _closer(self, index: int):
        def hook(module, args, output):
            spans = self.spans[index]
            if spans and spans[-1][1] is None:
                spans[-1][1] = self._mark()

        return hook

    def mean_seconds(self, indices: list[int]) -> float | None:
        """Mean seconds per decode call of one layer, over the layers `indices`."""
        synchronize(self.device)
        values = []
        for index in indices:
            for start, end in self.spans[index]:
                if end is not None:
                    values.append(start.elapsed_time(end) / 1e3 if self.device.type == "cuda" else end - start)
        return statistics.mean(values) if values else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class TokenClock:
    """A stopping criterion that never stops and stamps the time each new token is ready (after a device sync;
    generate syncs every step anyway to check for finished sequences)."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def time_decode(model, prompt_tokens: int, new_tokens: int, device: torch.device, layer_timer=None) -> dict:
    """Batch-1 greedy decode of `new_tokens` after a `prompt_tokens` prompt, after one warm-up generate of the same
    length (which also compiles, when the model compiles): the prefill is the time to the first new token, the
    decode speed the mean time per token after it."""
    from transformers import StoppingCriteriaList

    model.generation_config.eos_token_id = None  # decode exactly new_tokens
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, min(model.config.vocab_size, 100000), (1, prompt_tokens), generator=generator)
    prompt = prompt.to(device)

    def generate(timer=None) -> TokenClock:
        clock = TokenClock(device)
        synchronize(device)
        clock.start = time.perf_counter()
        if timer is not None:
            timer.active = True
        try:
            with torch.no_grad():
                output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                        do_sample=False, stopping_criteria=StoppingCriteriaList([clock]))  # fmt: skip
        finally:
            if timer is not None:
                timer.active = False
        if output.shape[1] != prompt_tokens + new_tokens or len(clock.stamps) != new_tokens:
            raise RuntimeError(f"generate made {output.shape[1] - prompt_tokens} tokens, asked for {new_tokens}")
        return clock

    warmup = generate()
    clock = generate(layer_timer)
    per_token = (clock.stamps[-1] - clock.stamps[0]) / (new_tokens - 1)
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "warmup_s": rounded(warmup.stamps[-1] - warmup.start),
        "prefill_s": rounded(clock.stamps[0] - clock.start),
        "ms_per_token": rounded(per_token * 1e3),
        "tokens_per_s": rounded(1.0 / per_token),
    }


# --- models -------------------------------------------------------------------------------------------------------


def model_configs(args):
    """(full, reduced): the released 16B config and the same at `--reduced_layers` depth (toy dims with --tiny)."""
    from modeling_deepseekmoe import DeepseekMoEConfig

    dims = TINY_DIMS if args.tiny else {}
    full_layers = TINY_FULL_LAYERS if args.tiny else DeepseekMoEConfig().num_hidden_layers
    full = DeepseekMoEConfig(**dims, num_hidden_layers=full_layers)
    return full, DeepseekMoEConfig(**dims, num_hidden_layers=args.reduced_layers)


def build_random_model(config, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A DeepseekMoEForCausalLM with random weights allocated directly in `dtype` on `device` (never an fp32 copy:
    the 16B is 32.75 GB in bf16), in eval mode, with the generation defaults `from_pretrained` applies."""
    from modeling_deepseekmoe import DeepseekMoEForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepseekMoEForCausalLM._from_config(config, dtype=dtype)
    model.apply_generation_defaults()
    return model.eval()


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of an unquantized module."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def activated_bytes_per_token(config, precision: str) -> int:
    """Weight bytes one decoded token reads at `precision` ("bf16", "nf4", "nf4-dq"): attention, the dense MLP or
    the router + shared experts + top-k routed experts of each layer, the norms and the LM head, as in
    `decode.activated_parameters`; attention and the expert/MLP projections at bitsandbytes' storage size
    (statistics included), routers, norms and the LM head in bf16 (they stay unquantized)."""
    from modeling_deepseekmoe.footprint import quantized_matrix_bytes

    def projections(matrices) -> int:
        return sum(quantized_matrix_bytes(out, inp, precision) for out, inp in matrices)

    def mlp(width: int) -> list[tuple[int, int]]:
        return [(width, hidden), (width, hidden), (hidden, width)]

    hidden = config.hidden_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    attention = projections([(q_out, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, q_out)])
    total = 2 * config.vocab_size * hidden  # LM head (the one embedding row read is negligible)
    for layer in range(config.num_hidden_layers):
        total += attention + 2 * 2 * hidden
        if config.is_moe_layer(layer):
            total += config.num_experts_per_tok * projections(mlp(config.moe_intermediate_size))
            total += 2 * config.n_routed_experts * hidden
            if config.n_shared_experts:
                total += projections(mlp(config.n_shared_experts * config.moe_intermediate_size))
        else:
            total += projections(mlp(config.intermediate_size))
    return total


def bound_fields(tokens_per_s: float | None, bytes_per_token: int, bandwidth_tb_s: float | None) -> dict:
    """The bandwidth bound of a decode step (every activated weight read once) and how close `tokens_per_s` is."""
    fields = {"activated_gb_per_token": rounded(bytes_per_token / 1e9)}
    if bandwidth_tb_s:
        bound = bandwidth_tb_s * 1e12 / bytes_per_token
        fields["bound_tokens_per_s"] = rounded(bound)
        if tokens_per_s is not None:
            fields["fraction_of_bound"] = rounded(tokens_per_s / bound)
    return fields


def bitsandbytes_problem() -> str | None:
    """Why 4-bit cannot run here (None when bitsandbytes imports)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # a missing package or a broken native library
        return f"bitsandbytes is not importable ({error_line(err)}); carry its wheel (see the runner note)"
    return None


def error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


# --- stages -------------------------------------------------------------------------------------------------------


class StageOutput:
    """The rows and notes a stage produces; every change is printed and passed to `on_change` (which saves it)."""

    def __init__(self, on_change: Callable[[dict], None] | None = None):
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.on_change = on_change

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print("  " + json.dumps(row), flush=True)
        self._changed()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)
        self._changed()

    def as_dict(self) -> dict:
        return {"rows": self.rows, "notes": self.notes}

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.as_dict())


class Context:
    """What a stage gets: the arguments, the device, its deadline, the configs, the shared scratch folder."""

    def __init__(self, args, device: torch.device, seconds: float, scratch_dir: Path, out: StageOutput):
        self.args, self.device, self.out = args, device, out
        self.deadline = time.monotonic() + seconds
        self.scratch_dir = scratch_dir
        self.memory = MemoryStats(device)
        self.peak_tflops, self.bandwidth_tb_s, _ = device_specs(args, device)

    @cached_property
    def full_config(self):
        return model_configs(self.args)[0]

    @cached_property
    def reduced_config(self):
        return model_configs(self.args)[1]

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def has_time(self, seconds: float, what: str) -> bool:
        """False (and a note) when fewer than `seconds` are left for `what`."""
        if self.time_left() >= seconds:
            return True
        self.out.note(f"skipped {what}: {self.time_left():.0f} s left of this stage's time, it needs ~{seconds:.0f} s")
        return False

    def checkpoint(self) -> Path:
        """The random bf16 checkpoint of the reduced config in the released layout, written once per suite run with
        the project's writer (shared by the stages that load one)."""
        from modeling_deepseekmoe.checkpoint import write_random_released_checkpoint

        config = self.reduced_config
        directory = (
            self.scratch_dir / f"random-{'tiny' if self.args.tiny else '16b'}-{config.num_hidden_layers}-layers"
        )
        if not (directory / "config.json").is_file():  # config.json is written last: its absence means unfinished
            shutil.rmtree(directory, ignore_errors=True)
            start = time.perf_counter()
            write_random_released_checkpoint(config, directory, dtype=torch.bfloat16)
            size = sum(f.stat().st_size for f in directory.iterdir())
            self.out.note(
                f"wrote a random {config.num_hidden_layers}-layer released-layout bf16 checkpoint "
                f"({size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s"
            )
        return directory


def stage_calibration(ctx: Context) -> None:
    device, dtype = ctx.device, torch.bfloat16
    size = 512 if ctx.args.tiny else 8192
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    seconds = statistics.median(time_calls(partial(torch.mm, a, b), device, warmup=3, repeats=10))
    tflops = 2 * size**3 / seconds / 1e12
    row = {"measurement": f"bf16 matmul {size}^3 (random data)", "value": rounded(tflops), "unit": "TFLOP/s"}
    if ctx.peak_tflops:
        row.update(datasheet=ctx.peak_tflops, fraction_of_datasheet=rounded(tflops / ctx.peak_tflops))
    ctx.out.add(row)
    del a, b

    copy_bytes = 64 * 2**20 if ctx.args.tiny else 4 * 2**30
    source = torch.ones(copy_bytes // 2, device=device, dtype=dtype)
    target = torch.empty_like(source)
    seconds = statistics.median(time_calls(partial(target.copy_, source), device, warmup=2, repeats=10))
    tb_s = 2 * copy_bytes / seconds / 1e12  # each byte read once and written once
    row = {"measurement": f"device copy {copy_bytes / 2**30:g} GiB (read + write)", "value": rounded(tb_s),
           "unit": "TB/s"}  # fmt: skip
    if ctx.bandwidth_tb_s:
        row.update(datasheet=ctx.bandwidth_tb_s, fraction_of_datasheet=rounded(tb_s / ctx.bandwidth_tb_s))
    ctx.out.add(row)


def stage_moe_block(ctx: Context) -> None:
    from benchmarks.moe_block import REFERENCE, Case, build_block, macs_per_token, measure
    from benchmarks.reference_moe import ReferenceMoE
    from modeling_deepseekmoe import DeepseekMoEConfig

    device, dtype, args = ctx.device, torch.bfloat16, ctx.args
    config = DeepseekMoEConfig(**(TINY_DIMS if args.tiny else {}), experts_implementation="auto")
    macs = macs_per_token(config)["total"]
    block = build_block(config, dtype, device, seed=0)
    reference = ReferenceMoE.from_block(block)
    generator = torch.Generator(device=device).manual_seed(1)
    for mode in ("inference", "train"):
        if not ctx.has_time(10, f"the {mode} cases"):
            break
        shape = (1, args.moe_tokens, config.hidden_size)
        hidden = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        grad_out = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        cases = [Case(REFERENCE, reference, REFERENCE, mode, hidden, grad_out, device)]
        cases += [Case(impl, block, impl, mode, hidden, grad_out, device) for impl in args.moe_implementations]
        ctx.memory.reset_peak()
        min_sample = 0.0 if args.tiny else 0.05  # a toy call is noise-sized anyway: do not repeat it
        measure(cases, warmup=1, repeats=args.repeats, min_sample_seconds=min_sample, long_call_seconds=20.0)
        peak = ctx.memory.peak_gb()
        reference_seconds = statistics.median(cases[0].samples)
        for case in cases:
            seconds = statistics.median(case.samples)
            tflops = (6 if mode == "train" else 2) * args.moe_tokens * macs / seconds / 1e12
            row = {
                "mode": "fwd+bwd" if mode == "train" else "forward",
                "tokens": args.moe_tokens,
                "implementation": case.name,
                "median_ms": rounded(seconds * 1e3),
                "tokens_per_s": rounded(args.moe_tokens / seconds),
                "model_tflops": rounded(tflops),
                "fraction_of_peak": rounded(tflops / ctx.peak_tflops) if ctx.peak_tflops else None,
                "speedup_vs_reference": rounded(reference_seconds / seconds),
                "max_abs_diff_vs_reference": float((case.output - cases[0].output).abs().max()),
                "peak_gb_all_cases": peak,
            }
            ctx.out.add(row)
        del cases, hidden, grad_out
        ctx.memory.release()


def decode_row(ctx: Context, model, config, path: str, timing: dict, extra: dict | None = None) -> dict:
    row = {"precision": "bf16", "path": path, "layers": config.num_hidden_layers, **(extra or {}), **timing}
    row["weights_gb"] = rounded(tensor_bytes(model) / 1e9)
    row["peak_gb"] = ctx.memory.peak_gb()
    row.update(bound_fields(timing["tokens_per_s"], activated_bytes_per_token(config, "bf16"), ctx.bandwidth_tb_s))
    return row


def stage_decode_bf16(ctx: Context) -> None:
    config, args = ctx.full_config, ctx.args
    start = time.perf_counter()
    model = build_random_model(config, ctx.device)
    synchronize(ctx.device)
    build_seconds = rounded(time.perf_counter() - start)
    ctx.memory.reset_peak()
    timing = time_decode(model, args.prompt_tokens, args.new_tokens, ctx.device)
    ctx.out.add(decode_row(ctx, model, config, "eager, DynamicCache", timing, {"build_s": build_seconds}))


def compile_config(ctx: Context):
    from transformers import CompileConfig

    if ctx.device.type == "cuda":
        return CompileConfig(mode=ctx.args.compile_mode)
    # Off a GPU generate compiles only when told to; the eager backend traces the same graph without inductor.
    config = CompileConfig(backend="eager", mode="default")
    config._compile_all_devices = True
    return config


def stage_decode_compiled(ctx: Context) -> None:
    config, args = ctx.full_config, ctx.args
    start = time.perf_counter()
    model = build_random_model(config, ctx.device)
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = compile_config(ctx)
    synchronize(ctx.device)
    ctx.out.note(f"built the model in {time.perf_counter() - start:.1f} s; compiling in the warm-up generate "
                 "(a timeout from here on means the compile did not finish in the time left)")  # fmt: skip
    ctx.memory.reset_peak()
    try:
        timing = time_decode(model, args.prompt_tokens, args.new_tokens, ctx.device)
    finally:
        torch._dynamo.reset()  # in a shared process (--isolate no) later code should not meet this model's graphs
    compiled = hasattr(model, "_compiled_call")  # set by generate when it compiled the decode step
    path = f"StaticCache + torch.compile ({model.generation_config.compile_config.backend}, "
    path += f"{model.generation_config.compile_config.mode})"
    ctx.out.add(decode_row(ctx, model, config, path, timing, {"compiled": compiled}))
    if not compiled:
        ctx.out.note("generate did not compile the decode step (its compile criteria were not met): eager timing")


def stage_quantized(ctx: Context) -> None:
    from transformers import AutoModelForCausalLM

    from benchmarks.memory import quantization_config
    from modeling_deepseekmoe.footprint import measured_footprint, memory_footprint

    full, reduced, args = ctx.full_config, ctx.reduced_config, ctx.args
    bnb_problem = bitsandbytes_problem()
    checkpoint = ctx.checkpoint()
    extra_moe_layers = len(full.moe_layer_indices) - len(reduced.moe_layer_indices)
    ctx.out.note(
        f"measured at {reduced.num_hidden_layers} layers ({len(reduced.moe_layer_indices)} MoE) at full width; the "
        f"`full_*` columns add {extra_moe_layers} MoE layers of the measured per-MoE-layer bytes and decode time "
        "(estimates; the decode peak above the weights is taken as depth-independent)"
    )
    for precision in args.precisions:
        row = {"precision": precision, "layers": reduced.num_hidden_layers}
        if precision != "bf16" and bnb_problem:
            ctx.out.add({**row, "skipped": bnb_problem})
            continue
        if not ctx.has_time(15, f"{precision} load + decode"):
            break
        try:
            ctx.memory.release()
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(
                checkpoint,
                dtype=torch.bfloat16,
                device_map={"": ctx.device.type} if ctx.device.type == "cuda" else None,
                quantization_config=quantization_config(precision),
            ).eval()
            synchronize(ctx.device)
            row["load_s"] = rounded(time.perf_counter() - start)
            weights = measured_footprint(model)
            moe_layer_bytes = measured_footprint(model.model.layers[reduced.moe_layer_indices[0]])
            row.update(weights_gb=rounded(weights / 1e9), resident_gb=ctx.memory.allocated_gb(),
                       load_peak_gb=ctx.memory.peak_gb())  # fmt: skip
            timer = LayerTimer(model.model.layers, ctx.device)
            ctx.memory.reset_peak()
            row.update(time_decode(model, args.prompt_tokens, args.quantized_new_tokens, ctx.device, timer))
            row["decode_peak_gb"] = ctx.memory.peak_gb()
            moe_layer_seconds = timer.mean_seconds(reduced.moe_layer_indices)
            timer.remove()
            row["moe_layer_ms_per_token"] = rounded(moe_layer_seconds * 1e3)
            full_weights = weights + extra_moe_layers * moe_layer_bytes
            full_seconds = row["ms_per_token"] / 1e3 + extra_moe_layers * moe_layer_seconds
            row["full_weights_gb_est"] = rounded(full_weights / 1e9)
            row["full_weights_gb_computed"] = rounded(memory_footprint(full).bytes(precision) / 1e9)
            if row["decode_peak_gb"] is not None and row["resident_gb"] is not None:
                overhead = row["decode_peak_gb"] - row["resident_gb"]
                row["full_decode_peak_gb_est"] = rounded(full_weights / 1e9 + overhead)
            row["full_tokens_per_s_est"] = rounded(1.0 / full_seconds)
            full_bound = bound_fields(row["full_tokens_per_s_est"], activated_bytes_per_token(full, precision),
                                      ctx.bandwidth_tb_s)  # fmt: skip
            row.update({f"full_{key}": value for key, value in full_bound.items()})
            del model, timer
        except Exception as err:  # one precision failing keeps the others
            traceback.print_exc()
            row["error"] = error_line(err)
        ctx.out.add(row)
        ctx.memory.release()


def stage_train(ctx: Context) -> None:
    from benchmarks.train_step import run_mode

    args, reduced = ctx.args, ctx.reduced_config
    checkpoint = ctx.checkpoint()
    settings = SimpleNamespace(
        device=ctx.device.type, lora_r=8, lora_target_modules=["all"], experts_implementation=None, batch_size=1,
        seq_len=args.train_seq_len, warmup_steps=args.train_warmup_steps, steps=args.train_steps,
    )  # fmt: skip
    ctx.out.note(
        f"{reduced.num_hidden_layers} layers at full width, LoRA r=8 on all targets (attention, experts, shared "
        f"experts, dense MLP), batch 1 x {args.train_seq_len} tokens, gradient checkpointing, bf16; mean of "
        f"{args.train_steps} steps after {args.train_warmup_steps} warm-up steps"
    )
    bnb_problem = bitsandbytes_problem()
    for mode in ("lora", "qlora"):
        row = {"mode": mode, "layers": reduced.num_hidden_layers}
        if mode == "qlora" and bnb_problem:
            ctx.out.add({**row, "skipped": bnb_problem})
            continue
        if not ctx.has_time(20, mode):
            break
        try:
            ctx.memory.release()
            result = run_mode(mode, checkpoint, reduced, settings)
            row.update({key: value for key, value in result.items() if key not in ("mode", "lora_target_modules")})
        except Exception as err:  # QLoRA failing keeps the LoRA row
            traceback.print_exc()
            row["error"] = error_line(err)
        ctx.out.add(row)
        ctx.memory.release()


def esft_expert_config(config, experts_per_layer: int, seed: int = 0) -> dict:
    """An ESFT expert config choosing `experts_per_layer` experts per MoE layer (a fixed random pick: for memory only
    the count matters)."""
    picker = random.Random(seed)
    experts = {
        str(layer): sorted(picker.sample(range(config.n_routed_experts), experts_per_layer))
        for layer in config.moe_layer_indices
    }
    return {"experts": experts, "shared_experts": False, "non_expert_modules": False}


def computed_trainable_parameters(config, experts_per_layer: int) -> dict:
    """Trainable parameters of full fine-tuning (everything but the routers, which the project keeps frozen) and of
    ESFT (only the selected routed experts)."""
    from modeling_deepseekmoe.footprint import memory_footprint

    routers = len(config.moe_layer_indices) * config.n_routed_experts * config.hidden_size
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    return {
        "full fine-tuning": memory_footprint(config).parameters - routers,
        "ESFT": len(config.moe_layer_indices) * experts_per_layer * expert,
    }


def stage_esft_memory(ctx: Context) -> None:
    from deepseekmoe.finetune.esft.experts import prepare_esft_model

    args, full, reduced, device = ctx.args, ctx.full_config, ctx.reduced_config, ctx.device
    k = args.esft_experts_per_layer
    ctx.out.note(
        f"ESFT trains {k} routed experts per MoE layer (shared experts and non-expert modules frozen); full "
        "fine-tuning trains every weight but the routers. AdamW keeps two states per trainable weight in its dtype "
        "(bf16 here: the project's trainer keeps bf16 weights); the fp32 column is the usual fp32-master setup. "
        f"Measured rows: {reduced.num_hidden_layers} layers at full width, one sequence of {args.train_seq_len} tokens"
    )
    for variant, trainable in computed_trainable_parameters(full, k).items():
        ctx.out.add({
            "variant": variant, "layers": full.num_hidden_layers, "how": "computed", "trainable_params": trainable,
            "grad_gb": rounded(2 * trainable / 1e9), "adamw_state_gb": rounded(4 * trainable / 1e9),
            "adamw_state_gb_fp32": rounded(8 * trainable / 1e9),
        })  # fmt: skip
    computed_reduced = computed_trainable_parameters(reduced, k)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, min(reduced.vocab_size, 100000), (1, args.train_seq_len), generator=generator).to(device)
    for variant in ("full fine-tuning", "ESFT"):
        row = {"variant": variant, "layers": reduced.num_hidden_layers, "how": "measured"}
        if not ctx.has_time(10, variant):
            break
        try:
            ctx.memory.release()
            model = build_random_model(reduced, device).train()
            if variant == "ESFT":
                prepare_esft_model(model, esft_expert_config(reduced, k))
            else:
                for name, parameter in model.named_parameters():
                    parameter.requires_grad_(not name.endswith(".mlp.gate.weight"))
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-5)
            weights_gb = ctx.memory.allocated_gb()
            ctx.memory.reset_peak()
            step_seconds = []
            for _ in range(2):  # the first step allocates the optimizer state; the second is timed
                synchronize(device)
                start = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                synchronize(device)
                step_seconds.append(time.perf_counter() - start)
            state_bytes = sum(
                value.numel() * value.element_size()
                for state in optimizer.state.values()
                for value in state.values()
                if torch.is_tensor(value)
            )
            count = sum(p.numel() for p in trainable)
            row.update(
                trainable_params=count, matches_computed=count == computed_reduced[variant],
                grad_gb=rounded(grad_bytes / 1e9), adamw_state_gb=rounded(state_bytes / 1e9),
                weights_gb=weights_gb, step_peak_gb=ctx.memory.peak_gb(), step_s=rounded(step_seconds[-1]),
            )  # fmt: skip
            del model, optimizer, trainable
        except Exception as err:
            traceback.print_exc()
            row["error"] = error_line(err)
        ctx.out.add(row)
        ctx.memory.release()


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    share_s: float  # its share of the default 540 s budget (scaled with --budget_s)
    min_s: float  # below this much time it is skipped
    run: Callable[[Context], None]


STAGES = (
    Stage("calibration", "Device calibration", 25, 5, stage_calibration),
    Stage("moe_block", "MoE block at the 16B dims", 50, 20, stage_moe_block),
    Stage("decode_bf16", "Batch-1 decode, full 16B, bf16, eager", 70, 30, stage_decode_bf16),
    Stage("quantized", "bf16 / 4-bit load, memory and decode (reduced depth, extrapolated)", 120, 40, stage_quantized),
    Stage("train", "LoRA / QLoRA train step (reduced depth)", 110, 40, stage_train),
    Stage("esft_memory", "ESFT vs full fine-tuning: trainable parameters and optimizer memory", 50, 20,
          stage_esft_memory),
    Stage("decode_compiled", "Batch-1 decode, full 16B, bf16, StaticCache + torch.compile", 115, 60,
          stage_decode_compiled),
)  # fmt: skip
STAGE_NAMES = [stage.name for stage in STAGES]


# --- running the stages -------------------------------------------------------------------------------------------


def device_specs(args, device: torch.device) -> tuple[float | None, float | None, str]:
    """(bf16 dense peak TFLOP/s, HBM TB/s, where they come from): the flags, else the datasheet table."""
    peak, bandwidth, source = None, None, "none known for this device"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).upper()
        for words, table_peak, table_bandwidth in DEVICE_SPECS:
            if all(word in name for word in words):
                peak, bandwidth, source = table_peak, table_bandwidth, f"datasheet ({' '.join(words)})"
                break
    if args.peak_tflops or args.bandwidth_tb_s:
        source = "flags" if peak is None else source + ", overridden by flags"
    return args.peak_tflops or peak, args.bandwidth_tb_s or bandwidth, source


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a stage process killed mid-write leaves the previous version."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def run_stage_here(stage: Stage, args, device, seconds: float, scratch_dir: Path, save=None) -> dict:
    """Run one stage in this process; returns its record (status ok / error, rows and notes so far)."""
    out = StageOutput(on_change=(lambda data: save({"status": "running", **data})) if save else None)
    record = {"status": "ok"}
    try:
        stage.run(Context(args, device, seconds, scratch_dir, out))
    except Exception as err:  # a failing stage keeps the others
        traceback.print_exc()
        record = {"status": "error", "error": error_line(err)}
    finally:
        MemoryStats(device).release()
    return {**record, **out.as_dict()}


def run_stage_isolated(stage: Stage, argv: list[str], seconds: float, scratch_dir: Path) -> dict:
    """Run one stage in a child process of its own (a crash, a poisoned CUDA context or a hang then costs only this
    stage, and its GPU memory is returned); killed when its time is up, keeping the rows it had saved."""
    handle, result_path = tempfile.mkstemp(prefix=f"gpu_suite_{stage.name}_", suffix=".json")
    os.close(handle)
    result_path = Path(result_path)
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--scratch_dir", str(scratch_dir)]
    command += ["--stage_process", stage.name, "--stage_result", str(result_path), "--stage_seconds", f"{seconds:.1f}"]
    child = subprocess.Popen(command, start_new_session=True)
    timed_out = False
    try:
        returncode = child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(child.pid, signal.SIGKILL)  # its own session: the child and whatever it started
        except ProcessLookupError:  # it ended in between
            pass
        returncode = child.wait()
    try:
        record = json.loads(result_path.read_text()) if result_path.stat().st_size else {}
    finally:
        result_path.unlink(missing_ok=True)
    record.setdefault("rows", [])
    record.setdefault("notes", [])
    if timed_out:
        record.update(status="timeout", error=f"killed after its {seconds:.0f} s (rows saved before that are kept)")
    elif record.get("status") in (None, "running"):
        record.update(status="error", error=f"the stage process exited with code {returncode} before finishing")
    return record


def stage_process_main(args) -> int:
    """The child side of `run_stage_isolated`: run the one stage, saving its record after every change."""
    stage = next(s for s in STAGES if s.name == args.stage_process)
    result_path = Path(args.stage_result)
    device = torch.device(args.device)

    def save(data):
        write_json(result_path, data)

    save({"status": "running", "rows": [], "notes": []})
    save(run_stage_here(stage, args, device, args.stage_seconds, Path(args.scratch_dir), save))
    return 0


def distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment(args, device: torch.device) -> dict:
    from benchmarks.moe_block import cpu_isa, cpu_model

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
    }
    for package in ("transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "safetensors"):
        env[package] = distribution_version(package)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        env.update(
            device_name=torch.cuda.get_device_name(device),
            gpu_memory_gb=round(properties.total_memory / 1e9, 1),
            compute_capability=f"{properties.major}.{properties.minor}",
        )
    else:
        env["device_name"] = env["cpu"]
    peak, bandwidth, source = device_specs(args, device)
    env.update(peak_bf16_tflops=peak, bandwidth_tb_s=bandwidth, specs_source=source)
    return env


def output_stem(args, env: dict) -> str:
    name = env["device_name"].lower().replace("nvidia", "") if args.device == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    while "__" in slug:
        slug = slug.replace("__", "_")
    return f"gpu_suite_{'tiny_' if args.tiny else ''}{slug}"


def run_suite(args, argv: list[str]) -> dict:
    device = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device is visible: run with --tiny --device cpu to check the code paths on CPU.")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cuda")
    selected = [stage for stage in STAGES if stage.name in args.stages]
    scale = args.budget_s / DEFAULT_BUDGET_S
    start = time.monotonic()
    deadline = start + args.budget_s
    scratch_dir = Path(args.scratch_dir) if args.scratch_dir else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args, device)
    stem = output_stem(args, env)
    report = {
        "suite": "benchmarks/gpu_suite.py",
        "command": "python benchmarks/gpu_suite.py " + " ".join(argv),
        "tiny": args.tiny,
        "isolated_stages": isolate,
        "budget_s": args.budget_s,
        "environment": env,
        "settings": {key: value for key, value in vars(args).items() if not key.startswith("stage_")},
        "stages": [],
    }
    print(f"[gpu_suite] {env['device_name']}, torch {env['torch']}, transformers {env['transformers']}; "
          f"budget {args.budget_s:.0f} s; stages {' '.join(s.name for s in selected)}", flush=True)  # fmt: skip
    try:
        for index, stage in enumerate(selected):
            reserved = scale * sum(later.share_s for later in selected[index + 1 :])
            seconds = deadline - time.monotonic() - reserved  # its share plus what the stages before it left
            record = {"stage": stage.name, "title": stage.title, "allowance_s": round(seconds, 1)}
            began = time.monotonic()
            if seconds < stage.min_s:
                why = (
                    f"skipped: {max(seconds, 0):.0f} s left for it within --budget_s {args.budget_s:.0f}, it needs "
                    f"at least {stage.min_s:.0f} s"
                )
                record.update(status="skipped", rows=[], notes=[why])
            else:
                print(f"[gpu_suite] {stage.name}: starting ({seconds:.0f} s allowed)", flush=True)
                if isolate:
                    record.update(run_stage_isolated(stage, argv, seconds, scratch_dir))
                else:
                    record.update(run_stage_here(stage, args, device, seconds, scratch_dir))
            record["seconds"] = round(time.monotonic() - began, 1)
            report["stages"].append(record)
            report["total_s"] = round(time.monotonic() - start, 1)
            write_outputs(report, output_dir, stem)
            print(f"[gpu_suite] {stage.name}: {record['status']} in {record['seconds']:.1f} s "
                  f"({max(deadline - time.monotonic(), 0):.0f} s of the budget left)"
                  + (f": {record['error']}" if record.get("error") else ""), flush=True)  # fmt: skip
    finally:
        if not args.scratch_dir:
            shutil.rmtree(scratch_dir, ignore_errors=True)
    print("\n" + phase_table(report) + f"\n\nWrote {output_dir / stem}.json and .md", flush=True)
    return report


# --- report -------------------------------------------------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "/")


def rows_table(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return lines


def phase_table(report: dict) -> str:
    lines = ["| stage | status | seconds | allowed s | error |", "|---|---|---:|---:|---|"]
    for record in report["stages"]:
        cells = [record["stage"], record["status"], _cell(record.get("seconds")), _cell(record.get("allowance_s")),
                 _cell(record.get("error"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    env = report["environment"]
    packages = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes")
    versions = ", ".join(f"{name} {env.get(name) or 'missing'}" for name in packages)
    out = [f"# GPU readiness suite on {env['device_name']}", ""]
    if report["tiny"]:
        out += ["**`--tiny` run: toy dims on this device, a check of the code paths; the figures mean nothing.**", ""]
    out += [
        (
            f"Generated by `benchmarks/gpu_suite.py` on {env['date']} (commit {env.get('git_commit') or 'unknown'}): "
            f"`{report['command'].strip()}`. Random weights created on the machine (no hub)."
        ),
        "",
        f"- device: {env['device_name']}"
        + (
            f", {env['gpu_memory_gb']} GB, compute capability {env['compute_capability']}, CUDA {env['cuda']}"
            if env["device"] == "cuda"
            else ""
        )
        + f"; host CPU {env['cpu']} ({env['cpu_count']} CPUs)",
        f"- {versions}, Python {env['python']}",
        (
            f"- peak used for fractions: dense bf16 {_cell(env['peak_bf16_tflops']) or '(unknown)'} TFLOP/s, HBM "
            f"{_cell(env['bandwidth_tb_s']) or '(unknown)'} TB/s ({env['specs_source']}; `--peak_tflops` / "
            "`--bandwidth_tb_s` override); the calibration rows give what this machine reaches"
        ),
        f"- budget {report['budget_s']:.0f} s, run {report.get('total_s', 0):.0f} s; stages "
        + ("in processes of their own" if report["isolated_stages"] else "in one process"),
        "",
        "## Phase timings",
        "",
        phase_table(report),
        "",
    ]
    for record in report["stages"]:
        out += [f"## {record['title']} (`{record['stage']}`: {record['status']})", ""]
        if record.get("error"):
            out += [f"Error: {record['error']}", ""]
        if record.get("rows"):
            out += [*rows_table(record["rows"]), ""]
        out += [f"- {note}" for note in record.get("notes", [])]
        if record.get("notes"):
            out.append("")
    return "\n".join(out)


def write_outputs(report: dict, output_dir: Path, stem: str) -> None:
    write_json(output_dir / f"{stem}.json", report)
    (output_dir / f"{stem}.md").write_text(to_markdown(report))


# --- command line -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="toy dims (a few seconds on CPU): checks the code paths")
    parser.add_argument("--output_dir", default=str(RESULTS_DIR))
    parser.add_argument("--stages", nargs="+", default=STAGE_NAMES, choices=STAGE_NAMES)
    parser.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S, help="the whole run ends within this")
    parser.add_argument("--isolate", default="auto", choices=["auto", "yes", "no"],
                        help="each stage in a process of its own (auto: on a GPU)")  # fmt: skip
    parser.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak (default: datasheet table)")
    parser.add_argument("--bandwidth_tb_s", type=float, default=None, help="HBM bandwidth (default: datasheet table)")
    parser.add_argument("--scratch_dir", default=None, help="where the random checkpoint goes (default: a temp dir)")
    parser.add_argument(
        "--reduced_layers",
        type=int,
        default=None,
        help="depth of the checkpoint the quantized / train / ESFT stages use (default 4; tiny 2)",
    )
    parser.add_argument("--moe_tokens", type=int, default=None, help="tokens per MoE block call (default 16384)")
    parser.add_argument("--moe_implementations", nargs="+", default=["auto", "sorted_loop"])
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per MoE block case (default 3)")
    parser.add_argument("--prompt_tokens", type=int, default=None, help="decode prompt length (default 32)")
    parser.add_argument("--new_tokens", type=int, default=None, help="bf16 decode tokens (default 128)")
    parser.add_argument("--quantized_new_tokens", type=int, default=None, help="quantized-stage decode tokens (32)")
    parser.add_argument(
        "--precisions", nargs="+", default=["bf16", "nf4", "nf4-dq"], choices=["bf16", "nf4", "nf4-dq"]
    )
    parser.add_argument("--compile_mode", default="reduce-overhead", help="torch.compile mode of the compiled decode")
    parser.add_argument("--train_seq_len", type=int, default=None, help="train / ESFT sequence length (default 2048)")
    parser.add_argument("--train_steps", type=int, default=None, help="timed train steps (default 5)")
    parser.add_argument("--train_warmup_steps", type=int, default=None, help="untimed train steps (default 2)")
    parser.add_argument("--esft_experts_per_layer", type=int, default=5)
    # The child side of --isolate (set by the suite itself).
    parser.add_argument("--stage_process", default=None, choices=STAGE_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--stage_result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage_seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {  # (GPU, --tiny)
        "reduced_layers": (4, TINY_REDUCED_LAYERS), "moe_tokens": (16384, 32), "repeats": (3, 1),
        "prompt_tokens": (32, 4), "new_tokens": (128, 4), "quantized_new_tokens": (32, 3),
        "train_seq_len": (2048, 32), "train_steps": (5, 1), "train_warmup_steps": (2, 1),
    }  # fmt: skip
    for name, (gpu_value, tiny_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny_value if args.tiny else gpu_value)
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu at the 16B shapes needs tens of GB and hours; add --tiny to check the code paths")
    full_layers = TINY_FULL_LAYERS if args.tiny else 28
    if not 2 <= args.reduced_layers <= full_layers:
        parser.error(f"--reduced_layers must be 2..{full_layers} (layer 0 is dense: at least one MoE layer is needed)")
    if args.new_tokens < 2 or args.quantized_new_tokens < 2:
        parser.error("--new_tokens and --quantized_new_tokens must be at least 2 (the decode time is a difference)")
    if not 0 < args.esft_experts_per_layer <= (TINY_DIMS["n_routed_experts"] if args.tiny else 64):
        parser.error("--esft_experts_per_layer must be between 1 and the number of routed experts")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.stage_process:
        return stage_process_main(args)
    report = run_suite(args, argv)
    return 0 if all(record["status"] in ("ok", "skipped") for record in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
