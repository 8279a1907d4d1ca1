#!/usr/bin/env python
"""Throughput of ONE DeepSeekMoE MoE block at the 16B dims (H 2048, expert width 1408, 64 routed experts top-6,
2 shared experts), native `DeepseekMoESparseMoeBlock` (each experts implementation) against the released
algorithm (`benchmarks/reference_moe.py`), with the same weights in the same process.

Measured, per dtype and token count N (one sequence of N tokens, input [1, N, 2048]):
- inference: eval mode, `torch.no_grad()`, forward only; N = 1 is the 1-token decode step, N > 1 is prefill.
  The reference runs its `moe_infer` branch.
- train: training mode, forward + backward of `(out * g).sum()` with a fixed random g, input requiring grad
  (the block sits inside a network), aux loss on (alpha 0.001, seq_aux); the reference runs its training branch.

Each timing is the median of `--repeats` samples taken round-robin over the implementations (so a change in
machine load hits all of them alike), after one warmup call each. Small cases repeat the call inside a sample
until it lasts at least `--min-sample-seconds`.

Model FLOPs (the work a dense implementation of the routed computation must do, no padding, no wasted experts):
    MACs per token = K * 3 * H * I  (routed experts: gate, up, down)  + 3 * H * S  (shared, S = n_shared * I)
                     + H * E  (router)
    forward FLOPs = 2 * N * MACs per token;   forward + backward FLOPs = 6 * N * MACs per token
(the backward computes input and weight gradients: twice the forward). Element-wise work (SiLU, softmax, weighting,
aux loss) is not counted. At the 16B dims MACs per token = 51.9M + 17.3M + 0.13M = 69.3M.

Examples:
    python benchmarks/moe_block.py                                   # CPU, bf16, 1/16/1024 tokens
    python benchmarks/moe_block.py --dtype bf16 fp32 --tokens 1 16 1024 2048 --merge
    python benchmarks/moe_block.py --device cuda --dtype bf16 --tokens 1 16 1024 4096
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

import modeling_deepseekmoe  # noqa: E402,F401  (registers the "sorted_loop" / "auto" experts implementations)
from benchmarks.reference_moe import ReferenceMoE  # noqa: E402
from modeling_deepseekmoe import DeepseekMoEConfig  # noqa: E402
from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoESparseMoeBlock  # noqa: E402


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
REFERENCE = "reference"
OUR_IMPLEMENTATIONS = ["auto", "sorted_loop", "grouped_mm", "batched_mm", "eager"]
H100_DENSE_BF16_PEAK_TFLOPS = 989.0  # H100 SXM, dense (no sparsity) bf16 tensor-core peak


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 1024], help="tokens per call (N)")
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--implementations",
        nargs="+",
        default=OUR_IMPLEMENTATIONS,
        help=f"our experts implementations to time next to the reference (choices: {' '.join(OUR_IMPLEMENTATIONS)})",
    )
    parser.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    parser.add_argument("--no-reference", action="store_true", help="do not time the reference")
    parser.add_argument("--repeats", type=int, default=3, help="timed samples per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case")
    parser.add_argument("--min-sample-seconds", type=float, default=0.05)
    parser.add_argument(
        "--long-call-seconds",
        type=float,
        default=20.0,
        help="a warmup call longer than this is kept as the first timed sample (saves minutes in slow bf16 cases)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-extra-gb",
        type=float,
        default=4.0,
        help="skip a case whose implementation would allocate more than this (batched_mm gathers one weight copy "
        "per (token, slot))",
    )
    parser.add_argument(
        "--include-slow",
        action="store_true",
        help="also time eager forward+backward (each per-expert slice backward materialises a full-size 3D "
        "gradient: tens of seconds per call at these dims on CPU)",
    )
    parser.add_argument("--output", default=None, help="markdown path (default benchmarks/results/moe_block_<dev>.md)")
    parser.add_argument("--merge", action="store_true", help="merge into an existing JSON next to --output")
    parser.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON, run nothing")
    parser.add_argument("--notes", default=None, help="markdown file whose text goes into the report's Notes section")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.implementations) - set(OUR_IMPLEMENTATIONS))
    if unknown:
        parser.error(f"unknown implementations {unknown}; choose from {OUR_IMPLEMENTATIONS}")
    return args


# --- environment ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_isa() -> str:
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return ", ".join(flag for flag in wanted if flag in flags) or "no AVX2"


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = env["cpu"]
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- model construction -----------------------------------------------------------------------------------------


def build_block(config: DeepseekMoEConfig, dtype: torch.dtype, device: torch.device, seed: int):
    """The native block, allocated directly in `dtype` on `device` and initialised like the released model
    (experts and shared experts N(0, 0.02), router kaiming-uniform)."""
    with torch.device("meta"):
        block = DeepseekMoESparseMoeBlock(config)
    block = block.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(config.hidden_size)  # kaiming_uniform(a=sqrt(5)) on [E, H]
        block.gate.weight.uniform_(-bound, bound, generator=generator)
        for param in (block.experts.gate_up_proj, block.experts.down_proj):
            for expert in range(param.shape[0]):  # per expert, so fp32 temporaries stay small
                param[expert].normal_(0.0, config.initializer_range, generator=generator)
        for linear in (block.shared_experts.gate_proj, block.shared_experts.up_proj, block.shared_experts.down_proj):
            linear.weight.normal_(0.0, config.initializer_range, generator=generator)
    return block


def macs_per_token(config: DeepseekMoEConfig) -> dict:
    hidden, inter, top_k = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    shared = (config.n_shared_experts or 0) * inter
    parts = {
        "routed": top_k * 3 * hidden * inter,
        "shared": 3 * hidden * shared,
        "router": hidden * config.n_routed_experts,
    }
    parts["total"] = sum(parts.values())
    return parts


def extra_bytes(implementation: str, mode: str, tokens: int, config: DeepseekMoEConfig, dtype: torch.dtype) -> int:
    """Rough size of the big temporaries an implementation allocates beyond activations (batched_mm gathers the
    weights of every (token, slot) pair; its backward also scatters their gradients)."""
    if implementation != "batched_mm":
        return 0
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    gathered = tokens * config.num_experts_per_tok * per_expert * torch.finfo(dtype).bits // 8
    return gathered * (3 if mode == "train" else 1)


# --- timing -----------------------------------------------------------------------------------------------------


class Case:
    """One (implementation, mode) on fixed inputs: `run()` does one call, timed by the caller."""

    def __init__(self, name, module, implementation, mode, hidden, grad_out, device):
        self.name, self.module, self.implementation, self.mode = name, module, implementation, mode
        self.hidden, self.grad_out, self.device = hidden, grad_out, device
        self.inner = 1
        self.samples: list[float] = []
        self.output = None

    def _prepare(self):
        if self.implementation != REFERENCE:
            self.module.config._experts_implementation = self.implementation
        self.module.train(self.mode == "train")

    def call(self, keep_output=False):
        self._prepare()
        if self.mode == "inference":
            with torch.no_grad():
                out = self.module(self.hidden)
        else:
            self.module.zero_grad(set_to_none=True)
            hidden = self.hidden.detach().requires_grad_(True)
            out = self.module(hidden)
            out.backward(self.grad_out)
        if keep_output:
            self.output = out.detach().float().cpu()
        return out

    def timed_sample(self) -> float:
        self._prepare()
        if self.mode == "train":
            self.module.zero_grad(set_to_none=True)
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(self.inner):
            self.call()
        synchronize(self.device)
        elapsed = (time.perf_counter() - start) / self.inner
        if self.mode == "train":
            self.module.zero_grad(set_to_none=True)  # free the gradients before the next implementation runs
        return elapsed


def measure(cases: list[Case], warmup: int, repeats: int, min_sample_seconds: float, long_call_seconds: float) -> None:
    """Warmup, then `repeats` samples per case taken round-robin. A first call longer than `long_call_seconds`
    (minutes-long bf16 cases on CPUs without bf16 GEMM kernels) is kept as the first sample instead of repeated."""
    for case in cases:
        if case.mode == "train":
            case.module.zero_grad(set_to_none=True)
        synchronize(case.device)
        start = time.perf_counter()
        case.call(keep_output=True)
        synchronize(case.device)
        first = time.perf_counter() - start
        if case.mode == "train":
            case.module.zero_grad(set_to_none=True)
        if first > long_call_seconds:
            case.samples.append(first)
            continue
        for _ in range(max(0, warmup - 1)):
            case.call()
        case.inner = max(1, min(50, math.ceil(min_sample_seconds / max(first, 1e-6))))
        if case.mode == "train":
            case.module.zero_grad(set_to_none=True)
    for _ in range(repeats):  # round-robin: load changes hit every implementation alike
        for case in cases:
            if len(case.samples) < repeats:
                case.samples.append(case.timed_sample())
    gc.collect()


# --- main loop --------------------------------------------------------------------------------------------------


def run(args, on_progress=None) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = DeepseekMoEConfig(experts_implementation="auto")  # the 16B MoE dims, alpha 0.001, seq_aux
    macs = macs_per_token(config)
    results = []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        torch.manual_seed(args.seed)
        print(f"[{dtype_name}] building the block and the reference (same weights)...", flush=True)
        block = build_block(config, dtype, device, args.seed)
        reference = None if args.no_reference else ReferenceMoE.from_block(block)
        generator = torch.Generator(device=device).manual_seed(args.seed + 1)
        for mode in args.modes:
            for tokens in args.tokens:
                hidden = torch.randn(1, tokens, config.hidden_size, generator=generator, device=device, dtype=dtype)
                grad_out = torch.randn(1, tokens, config.hidden_size, generator=generator, device=device, dtype=dtype)
                cases, skipped = [], []
                if reference is not None:
                    cases.append(Case(REFERENCE, reference, REFERENCE, mode, hidden, grad_out, device))
                for implementation in args.implementations:
                    need = extra_bytes(implementation, mode, tokens, config, dtype)
                    if need > args.max_extra_gb * 2**30:
                        skipped.append((implementation, f"would allocate ~{need / 2**30:.0f} GB (--max-extra-gb)"))
                        continue
                    if implementation == "eager" and mode == "train" and not args.include_slow:
                        skipped.append((implementation, "slow: full-size 3D gradient per expert slice (--include-slow)"))
                        continue
                    cases.append(Case(implementation, block, implementation, mode, hidden, grad_out, device))
                load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                measure(cases, args.warmup, args.repeats, args.min_sample_seconds, args.long_call_seconds)
                load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                ref_case = cases[0] if reference is not None else None
                for case in cases:
                    median = statistics.median(case.samples)
                    flops = (6 if mode == "train" else 2) * tokens * macs["total"]
                    row = {
                        "dtype": dtype_name,
                        "mode": mode,
                        "tokens": tokens,
                        "implementation": case.name,
                        "median_s": median,
                        "samples_s": case.samples,
                        "inner_calls_per_sample": case.inner,
                        "tokens_per_s": tokens / median,
                        "model_tflops": flops / median / 1e12,
                        "load_avg_1min": [load_before, load_after],
                    }
                    if ref_case is not None:
                        row["speedup_vs_reference"] = statistics.median(ref_case.samples) / median
                        row["max_abs_diff_vs_reference"] = (case.output - ref_case.output).abs().max().item()
                    if device.type == "cuda" and dtype == torch.bfloat16:
                        row["fraction_of_989_tflops"] = row["model_tflops"] / H100_DENSE_BF16_PEAK_TFLOPS
                    results.append(row)
                    print(
                        f"  {dtype_name} {mode:9s} N={tokens:5d} {case.name:11s} {median * 1e3:10.2f} ms "
                        f"{tokens / median:10.1f} tok/s  x{row.get('speedup_vs_reference', float('nan')):.2f} vs ref",
                        flush=True,
                    )
                for implementation, why in skipped:
                    results.append(
                        {"dtype": dtype_name, "mode": mode, "tokens": tokens, "implementation": implementation,
                         "skipped": why}
                    )
                    print(f"  {dtype_name} {mode:9s} N={tokens:5d} {implementation:11s} skipped: {why}", flush=True)
                for case in cases:
                    case.output = None
                if on_progress is not None:
                    on_progress(make_report(device, config, macs, args, results))
        del block, reference
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return make_report(device, config, macs, args, results)


def make_report(device, config, macs, args, results) -> dict:
    return {
        "environment": environment(device),
        "device": device.type,
        "config": {
            "hidden_size": config.hidden_size,
            "moe_intermediate_size": config.moe_intermediate_size,
            "n_routed_experts": config.n_routed_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "n_shared_experts": config.n_shared_experts,
            "aux_loss_alpha": config.aux_loss_alpha,
            "seq_aux": config.seq_aux,
        },
        "macs_per_token": macs,
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "long_call_seconds": args.long_call_seconds,
            "seed": args.seed,
            "batch": 1,
        },
        "results": results,
    }


# --- reports ----------------------------------------------------------------------------------------------------


def _key(row):
    return (row["dtype"], row["mode"], row["tokens"], row["implementation"])


def merge_reports(old: dict, new: dict) -> dict:
    rows = {_key(row): row for row in old.get("results", [])}
    rows.update({_key(row): row for row in new["results"]})
    merged = dict(new)
    merged["results"] = list(rows.values())
    if "notes" in old and "notes" not in new:
        merged["notes"] = old["notes"]
    return merged


def target_lines(report: dict) -> list[str]:
    """The targets: bf16, 1024 tokens, training fwd+bwd >= 2x the reference; inference (prefill, 1-token decode)
    no slower than the reference. Checked for our default ("auto") and for sorted_loop."""
    rows = {_key(row): row for row in report["results"] if "median_s" in row}
    lines = []
    for impl in ("auto", "sorted_loop"):
        for dtype in sorted({row["dtype"] for row in report["results"]}):
            checks = []
            train = rows.get((dtype, "train", 1024, impl))
            if train and "speedup_vs_reference" in train:
                speedup = train["speedup_vs_reference"]
                if dtype == "bf16":
                    verdict = "MET" if speedup >= 2.0 else "NOT MET"
                    checks.append(f"train N=1024 x{speedup:.2f} (target >= 2): {verdict}")
                else:
                    checks.append(f"train N=1024 x{speedup:.2f} (the >= 2 target is stated for bf16)")
            for (d, mode, tokens, i), row in sorted(rows.items()):
                if d == dtype and i == impl and mode == "inference" and "speedup_vs_reference" in row:
                    what = "decode N=1" if tokens == 1 else f"prefill N={tokens}"
                    ok = row["speedup_vs_reference"] >= 1.0
                    checks.append(f"{what} x{row['speedup_vs_reference']:.2f} (target >= 1): {'MET' if ok else 'NOT MET'}")
            if checks:
                lines.append(f"- `{impl}`, {dtype}: " + "; ".join(checks))
    return lines


def to_markdown(report: dict) -> str:
    env = report["environment"]
    macs = report["macs_per_token"]
    cuda = report["device"] == "cuda"
    out = [
        f"# One DeepSeekMoE MoE block at the 16B dims: {report['device'].upper()}",
        "",
        "Generated by `benchmarks/moe_block.py`. Block: H 2048, expert width 1408, 64 routed experts top-6, 2 shared "
        "experts (width 2816), aux loss alpha 0.001 with seq_aux in training. Input: one sequence of N tokens. "
        "`reference` is `benchmarks/reference_moe.py` (the released algorithm: `moe_infer` for inference, the "
        "repeat-interleave/all-experts training branch for fwd+bwd), loaded with the same weights in the same process.",
        "",
        f"- device: {env['device_name']}" + (f" (ISA: {env['cpu_isa']})" if not cuda else f", CUDA {env.get('cuda')}"),
        f"- torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}, "
        f"{env['threads']} torch threads ({env['cpu_count']} CPUs)",
        f"- timings: medians of up to {report['settings']['repeats']} samples per case (`n`), after "
        f"{report['settings']['warmup']} warmup call, samples taken round-robin over the implementations; a sample "
        "of a short case repeats the call until it lasts >= 50 ms; a first call longer than "
        f"{report['settings'].get('long_call_seconds', 20):.0f} s is kept as a sample. `load` is the 1-minute load "
        "average before/after the case (the machine is shared: numbers taken at a load well above the thread count "
        "are noisy).",
        "- `auto` is our default; on CPU it dispatches to `sorted_loop` (on CUDA to `grouped_mm`).",
        f"- model FLOPs: MACs/token = K*3*H*I + 3*H*S + H*E = {macs['routed'] / 1e6:.1f}M + {macs['shared'] / 1e6:.1f}M"
        f" + {macs['router'] / 1e6:.2f}M = {macs['total'] / 1e6:.1f}M; forward = 2*N*MACs, forward+backward = "
        "6*N*MACs (element-wise work not counted).",
        "",
    ]
    target = target_lines(report)
    if target:
        out += ["## Targets", "", *target, ""]
    if report.get("notes"):
        out += ["## Notes", "", report["notes"].strip(), ""]
    rows = report["results"]
    for dtype in [d for d in DTYPES if any(r["dtype"] == d for r in rows)]:
        out += [f"## {dtype}", ""]
        header = "| mode | N | implementation | median ms | n | tokens/s | speedup vs reference | model GFLOP/s |"
        sep = "|---|---:|---|---:|---:|---:|---:|---:|"
        if cuda and dtype == "bf16":
            header += " % of 989 TFLOP/s |"
            sep += "---:|"
        header += " max abs diff vs ref | load |"
        sep += "---:|---|"
        out += [header, sep]
        order = {name: i for i, name in enumerate([REFERENCE, *OUR_IMPLEMENTATIONS])}
        for mode in ("inference", "train"):
            selected = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            selected.sort(key=lambda r: (r["tokens"], order.get(r["implementation"], 99)))
            for r in selected:
                label = "fwd+bwd" if mode == "train" else ("decode" if r["tokens"] == 1 else "prefill")
                if "skipped" in r:
                    cells = [label, str(r["tokens"]), r["implementation"], "skipped", "", "", "", ""]
                    if cuda and dtype == "bf16":
                        cells.append("")
                    cells += [r["skipped"], ""]
                else:
                    speed = r.get("speedup_vs_reference")
                    cells = [
                        label,
                        str(r["tokens"]),
                        f"**{r['implementation']}**" if r["implementation"] == "auto" else r["implementation"],
                        f"{r['median_s'] * 1e3:.1f}",
                        str(len(r["samples_s"])),
                        f"{r['tokens_per_s']:.1f}",
                        "" if speed is None else f"{speed:.2f}x",
                        f"{r['model_tflops'] * 1e3:.1f}",
                    ]
                    if cuda and dtype == "bf16":
                        cells.append(f"{100 * r.get('fraction_of_989_tflops', 0):.1f}%")
                    diff = r.get("max_abs_diff_vs_reference")
                    load = r.get("load_avg_1min") or [None, None]
                    cells += [
                        "" if diff is None else f"{diff:.1e}",
                        "/".join("?" if x is None else f"{x:.1f}" for x in load),
                    ]
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available: skipped.")
        return 0
    output = Path(args.output) if args.output else REPO_ROOT / "benchmarks" / "results" / f"moe_block_{args.device}.md"
    json_path = output.with_suffix(".json")
    previous = json.loads(json_path.read_text()) if json_path.exists() and (args.merge or args.render_only) else None
    notes = Path(args.notes).read_text() if args.notes else None

    def save(report):
        if notes is not None:
            report["notes"] = notes
        if previous is not None and report is not previous:
            report = merge_reports(previous, report)
        output.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        output.write_text(to_markdown(report) + "\n")
        return report

    # Results are saved after every case, so an interrupted run keeps what it measured.
    report = save(previous if args.render_only else run(args, on_progress=save))
    print("\n".join(target_lines(report)))
    print(f"wrote {output} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
