#!/usr/bin/env python
"""CPU 4-bit (bitsandbytes NF4) matmul paths at the 16B projection shapes, for the choice made in
`modeling_deepseekmoe.quantization.configure_4bit_cpu_kernels`.

Paths, each timed as one forward `y = x @ W.T` of a weight stored in NF4, eval mode, `torch.no_grad()`:
- `bnb packed`: `Linear4bit` with bitsandbytes' packed CPU layout (`support_avx512bf16_for_cpu`, AVX512-BF16 CPUs
  only; the weight is repacked once, on the first call, which is not timed). It computes in bf16 whatever the dtype.
- `bnb default`: `Linear4bit` with the packed layout turned off (dequantize the weight, then `F.linear`).
- `dequantize + F.linear`: the routed experts' own path (`dequantize_weight`, then `F.linear`).

Shapes (out x in): routed expert gate/up 1408x2048 and down 2048x1408, shared experts (2 x 1408 wide) gate/up
2816x2048 and down 2048x2816; 1 row (decode, and what a routed expert sees per hit on a decode step), 16 rows and
more (`--rows`); compute dtype bf16 and fp32 (`bnb_4bit_compute_dtype`, the input in the same dtype, the weight
quantized from that dtype).

Then the routed experts of one MoE layer (`DeepseekMoEQuantizedExperts`, 64 experts of width 1408, top-6, random
routing), inference: the packed per-expert loop (`configure_4bit_cpu_kernels`, the default where the CPU has the
kernel) against dequantizing the experts hit and running the `sorted_loop` implementation (`packed=False`).

Each figure is the median of `--repeats` samples taken round-robin over the paths, each sample repeating the call for
`--min-sample-seconds`.

    python benchmarks/bnb4_cpu_paths.py                  # writes benchmarks/results/bnb4_cpu_paths.md
    python benchmarks/bnb4_cpu_paths.py --output -       # prints the table only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import modeling_deepseekmoe  # noqa: E402,F401  (first: it drops bitsandbytes' import-time `kernels` notice)
import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from benchmarks.moe_block import cpu_isa, cpu_model  # noqa: E402
from modeling_deepseekmoe import DeepseekMoEConfig  # noqa: E402
from modeling_deepseekmoe.quantization import (  # noqa: E402
    DeepseekMoEExpertWeight,
    DeepseekMoEQuantizedExperts,
    configure_4bit_cpu_kernels,
    dequantize_weight,
    packed_4bit_cpu_kernel_available,
)


SHAPES = {
    "routed gate/up": (1408, 2048),
    "routed down": (2048, 1408),
    "shared gate/up": (2816, 2048),
    "shared down": (2048, 2816),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PATHS = ("bnb packed", "bnb default", "dequantize + F.linear")
CONCLUSIONS = "## What this decides"


def nf4_linear(out_features: int, in_features: int, dtype: torch.dtype, packed: bool, seed: int) -> bnb.nn.Linear4bit:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02
    weight = weight.to(dtype)
    linear = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4")
    linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=linear)._quantize("cpu")
    linear.support_avx512bf16_for_cpu = packed
    return linear.eval()


def calls(shape, dtype: torch.dtype, rows: int) -> dict:
    out_features, in_features = shape
    x = torch.randn(rows, in_features, dtype=dtype, generator=torch.Generator().manual_seed(1))
    default = nf4_linear(out_features, in_features, dtype, packed=False, seed=0)
    paths = {
        "bnb default": lambda: default(x),
        "dequantize + F.linear": lambda: F.linear(x, dequantize_weight(default.weight, dtype)),
    }
    if packed_4bit_cpu_kernel_available():
        packed = nf4_linear(out_features, in_features, dtype, packed=True, seed=0)
        paths["bnb packed"] = lambda: packed(x)
    return paths


def quantized_experts(config: DeepseekMoEConfig, dtype: torch.dtype) -> DeepseekMoEQuantizedExperts:
    with torch.device("meta"):
        experts = DeepseekMoEQuantizedExperts(config)
    hidden, width = config.hidden_size, config.moe_intermediate_size
    shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
    for index, (expert, name, _) in enumerate(experts.projections()):
        linear = nf4_linear(*shapes[name], dtype, packed=False, seed=index)
        setattr(expert, name, DeepseekMoEExpertWeight(linear))
    experts.compute_dtype = dtype
    return experts.eval()


def experts_calls(experts: DeepseekMoEQuantizedExperts, dtype: torch.dtype, tokens: int) -> dict:
    config = experts.config
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, config.hidden_size, generator=generator).to(dtype)
    scores = torch.rand(tokens, config.n_routed_experts, generator=generator)
    top_k_weights, top_k_index = scores.topk(config.num_experts_per_tok, dim=-1)
    top_k_weights = top_k_weights.to(dtype)

    def run(packed: bool):
        def call():
            if experts.packed_kernels != (packed and packed_4bit_cpu_kernel_available()):
                configure_4bit_cpu_kernels(experts, packed=packed)
            return experts(hidden, top_k_index, top_k_weights)

        return call

    paths = {"dequantize + sorted_loop": run(False)}
    if packed_4bit_cpu_kernel_available():
        paths["packed loop"] = run(True)
    return paths


def measure_experts(args) -> list[dict]:
    """The two paths share one experts module (the 16B layer's 4-bit weights take 0.3 GB): each call switches the
    layout when the other path ran last, so the samples are taken path by path, after a warmup that packs all."""
    config = DeepseekMoEConfig()
    config._experts_implementation = "sorted_loop"
    rows = []
    for dtype_name in args.dtype:
        experts = quantized_experts(config, DTYPES[dtype_name])
        for tokens in args.expert_tokens:
            paths = experts_calls(experts, DTYPES[dtype_name], tokens)
            times = {}
            with torch.no_grad():
                for path, call in paths.items():
                    call()
                    if path == "packed loop":  # pack every expert, not only those this routing hits
                        for _, _, projection in experts.projections():
                            projection.linear(torch.zeros(1, projection.in_features, dtype=DTYPES[dtype_name]))
                    times[path] = statistics.median(sample(call, args.min_sample_seconds) for _ in range(args.repeats))
            times = {path: value * 1e3 for path, value in times.items()}
            rows.append({"dtype": dtype_name, "tokens": tokens, "ms": times})
            print(f"experts {dtype_name} tokens={tokens}: " + ", ".join(f"{p} {t:.2f} ms" for p, t in times.items()))
        del experts
    return rows


def experts_table(rows: list[dict]) -> str:
    paths = ("packed loop", "dequantize + sorted_loop")
    lines = [
        "| dtype | tokens | " + " | ".join(f"{path} (ms)" for path in paths) + " | speedup of the packed loop |",
        "|---|---|" + "---|" * (len(paths) + 1),
    ]
    for row in rows:
        times = row["ms"]
        cells = [f"{times[path]:.2f}" if path in times else "n/a" for path in paths]
        speedup = "n/a"
        if "packed loop" in times:
            speedup = f"{times['dequantize + sorted_loop'] / times['packed loop']:.2f}x"
        lines.append(f"| {row['dtype']} | {row['tokens']} | " + " | ".join(cells) + f" | {speedup} |")
    return "\n".join(lines)


def sample(call, min_seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while True:
        call()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / count


def measure(args) -> list[dict]:
    rows = []
    for dtype_name in args.dtype:
        for name, shape in SHAPES.items():
            for tokens in args.rows:
                paths = calls(shape, DTYPES[dtype_name], tokens)
                samples = {path: [] for path in paths}
                with torch.no_grad():
                    for call in paths.values():
                        call()  # warmup (and the packed layout's one-time repacking)
                    for _ in range(args.repeats):
                        for path, call in paths.items():
                            samples[path].append(sample(call, args.min_sample_seconds))
                times = {path: statistics.median(values) * 1e3 for path, values in samples.items()}
                rows.append({"dtype": dtype_name, "shape": name, "out_in": shape, "rows": tokens, "ms": times})
                print(
                    f"{dtype_name} {name} {shape} rows={tokens}: "
                    + ", ".join(f"{p} {t:.3f} ms" for p, t in times.items())
                )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| dtype | projection (out x in) | rows | " + " | ".join(f"{path} (ms)" for path in PATHS) + " | fastest |",
        "|---|---|---|" + "---|" * (len(PATHS) + 1),
    ]
    for row in rows:
        times = row["ms"]
        fastest = min(times, key=times.get)
        cells = [f"{times[path]:.3f}" if path in times else "n/a" for path in PATHS]
        out_features, in_features = row["out_in"]
        lines.append(
            f"| {row['dtype']} | {row['shape']} ({out_features}x{in_features}) | {row['rows']} | "
            + " | ".join(cells)
            + f" | {fastest} |"
        )
    return "\n".join(lines)


def header() -> str:
    return (
        f"CPU: {cpu_model()}; flags: {cpu_isa()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"bitsandbytes packed kernel available: {packed_4bit_cpu_kernel_available()}.\n"
        f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb.__version__}, "
        f"{torch.get_num_threads()} threads; load average at the start {os.getloadavg()[0]:.1f}."
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--expert-tokens", type=int, nargs="+", default=[1, 16, 128, 1024])
    parser.add_argument("--no-experts", action="store_true", help="skip the routed-experts comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-sample-seconds", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "bnb4_cpu_paths.md"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    text = f"{header()}\n\n## One projection (`Linear4bit` forward)\n\n{table(rows)}\n"
    if not args.no_experts:
        text += f"\n## Routed experts of one MoE layer (64 x 1408, top-6)\n\n{experts_table(measure_experts(args))}\n"
    if args.output == "-":
        print(text)
        return
    output = Path(args.output)
    # The hand-written conclusions at the end of an earlier results file are kept (re-check them against the figures).
    previous = output.read_text() if output.is_file() else ""
    conclusions = previous[previous.index(CONCLUSIONS) :] if CONCLUSIONS in previous else ""
    output.write_text(f"# bitsandbytes 4-bit CPU paths (`benchmarks/bnb4_cpu_paths.py`)\n\n{text}\n{conclusions}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
