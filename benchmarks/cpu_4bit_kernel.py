"""The CPU 4-bit kernels, measured: one projection at the released shapes, and (with --checkpoint_dir) a decode step of
a 4-bit model, under each CPU path the project can choose.

Paths of one projection (nf4, bf16 compute, blocks of 64):
- `own <isa>`: `modeling_deepseekmoe.cpu_4bit_kernel` built for each vector ISA this CPU runs (an AVX2 build runs on
  an AVX512 CPU too, so an AVX512 machine measures the AVX2 variant as well);
- `bnb packed`: bitsandbytes' packed AVX512-BF16 kernel (`Linear4bit` with `support_avx512bf16_for_cpu`), where the CPU
  has it;
- `dequantize + matmul`: bitsandbytes' default CPU path (the whole matrix dequantized per call);
- `own dequantize + matmul`: the project's dequantization into reused memory, then a GEMM (an fp32 one from 8 rows
  where the CPU emulates bf16 GEMMs), what longer calls run where the own kernel is built.

The model decode (`--checkpoint_dir`, e.g. one written by `benchmarks/full_size.py --num_hidden_layers 3`) runs in a
fresh process per configuration, chosen with the environment switches `DEEPSEEKMOE_BNB_PACKED_KERNEL`,
`DEEPSEEKMOE_CPU_4BIT_KERNEL` and torch's `ATEN_CPU_CAPABILITY` (which lowers the ISA the own kernel is built for).

    python benchmarks/cpu_4bit_kernel.py [--checkpoint_dir DIR] [--output benchmarks/results/cpu_4bit_kernel]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"routed gate/up": (1408, 2048), "routed down": (2048, 1408), "shared gate/up": (2816, 2048),
          "attention q/k/v/o": (2048, 2048)}  # fmt: skip
DECODE_CONFIGURATIONS = {
    "default": {},
    "own kernel (native build), no packed kernel": {"DEEPSEEKMOE_BNB_PACKED_KERNEL": "0"},
    "own kernel (AVX2 build), no packed kernel": {"DEEPSEEKMOE_BNB_PACKED_KERNEL": "0", "ATEN_CPU_CAPABILITY": "avx2"},
    "dequantize + matmul only": {"DEEPSEEKMOE_BNB_PACKED_KERNEL": "0", "DEEPSEEKMOE_CPU_4BIT_KERNEL": "0"},
}


def median_ms(call, min_seconds: float = 0.3, samples: int = 7) -> float:
    call()
    times = []
    for _ in range(samples):
        repeats, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds / samples or repeats == 0:
            call()
            repeats += 1
        times.append((time.perf_counter() - start) / repeats * 1e3)
    return statistics.median(times)


def runnable_isas() -> list[str]:
    from modeling_deepseekmoe import cpu_4bit_kernel

    native = cpu_4bit_kernel.native_isa()
    order = ["avx512_bf16", "avx512", "avx2", "portable"]
    return order[order.index(native):]


def measure_projections(rows_list: list[int]) -> list[dict]:
    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit

    from modeling_deepseekmoe import cpu_4bit_kernel, quantization

    results = []
    generator = torch.Generator().manual_seed(0)
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
        data, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
        linears = {}
        for packed in (True, False):
            linear = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16)
            linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")._quantize("cpu")
            linear.support_avx512bf16_for_cpu = packed and quantization.packed_4bit_cpu_kernel_available()
            linears[packed] = linear.eval()
        for rows in rows_list:
            x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
            row = {"projection": name, "shape": f"{out_features}x{in_features}", "rows": rows}
            for isa in runnable_isas():
                row[f"own {isa}"] = median_ms(lambda: cpu_4bit_kernel.matmul(x, data, state, isa))
            with torch.inference_mode():
                if quantization.packed_4bit_cpu_kernel_available():
                    row["bnb packed"] = median_ms(lambda: linears[True](x))
                row["dequantize + matmul"] = median_ms(lambda: linears[False](x))
                if cpu_4bit_kernel.available():
                    weight = linears[False].weight
                    row["own dequantize + matmul"] = median_ms(lambda: quantization._dequantized_linear(x, weight))
            row["nf4 MB"] = data.numel() / 1e6
            results.append(row)
            print(row, flush=True)
    return results


def decode_child(checkpoint_dir: str, steps: int) -> dict:
    from modeling_deepseekmoe.loading import PRECISION_FLAGS, load_pretrained_model
    from modeling_deepseekmoe.quantization import describe_cpu_4bit_kernels

    model = load_pretrained_model(checkpoint_dir, dtype=torch.bfloat16, **PRECISION_FLAGS["nf4"]).eval()
    prompt = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(prompt)  # first call: packs the weights bitsandbytes' packed kernel takes
        start = time.perf_counter()
        output = model(prompt, use_cache=True)
        prefill_seconds = time.perf_counter() - start
        cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        for step in range(steps):
            start = time.perf_counter()
            output = model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
    # The first steps also pack experts first hit there; the median is the steady state.
    return {"prefill_32_seconds": prefill_seconds, "seconds_per_token": statistics.median(times[steps // 2:]),
            "kernels": describe_cpu_4bit_kernels()}  # fmt: skip


def measure_decode(checkpoint_dir: str, steps: int) -> list[dict]:
    results = []
    for name, switches in DECODE_CONFIGURATIONS.items():
        environment = {**os.environ, **switches}
        command = [sys.executable, __file__, "--_decode_child", checkpoint_dir, "--steps", str(steps)]
        completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
        if completed.returncode != 0 or not lines:
            results.append({"configuration": name, "error": completed.stderr.strip().splitlines()[-1:]})
        else:
            results.append({"configuration": name, **json.loads(lines[-1])})
        print(results[-1], flush=True)
    return results


def machine() -> dict:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    import bitsandbytes

    from modeling_deepseekmoe.environment import cpu_capabilities

    named = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")
    return {
        "cpu": cpu_capabilities().get("cpu", "unknown"),
        "torch capability": torch.backends.cpu.get_cpu_capability(),
        "flags": ", ".join(flag for flag in named if flag in flags),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "load average": os.getloadavg()[0],
    }


def render(results: dict) -> str:
    info = results["machine"]
    lines = ["# CPU 4-bit kernels (`benchmarks/cpu_4bit_kernel.py`)", "",
             f"CPU: {info['cpu']}; flags: {info['flags']}; torch capability {info['torch capability']}; "
             f"{info['threads']} threads; torch {info['torch']}, bitsandbytes {info['bitsandbytes']}; "
             f"load average at the start {info['load average']:.2f}.", "",
             "## One projection (nf4, bf16, median ms per call)", ""]  # fmt: skip
    rows = results["projections"]
    columns = [key for key in rows[0] if key not in ("projection", "shape", "rows", "nf4 MB")]
    lines.append("| projection | rows | " + " | ".join(columns) + " | fastest |")
    lines.append("|---|---:|" + "---:|" * len(columns) + "---|")
    for row in rows:
        fastest = min(columns, key=lambda column: row[column])
        cells = " | ".join(f"{row[column]:.3f}" for column in columns)
        lines.append(f"| {row['projection']} ({row['shape']}) | {row['rows']} | {cells} | {fastest} |")
    if results.get("decode"):
        header = "| configuration | 32-token forward (s) | decode s/token | kernels |"
        lines += ["", f"## Decode step of a 4-bit model ({results['checkpoint']})", "", header, "|---|---:|---:|---|"]
        for row in results["decode"]:
            if "seconds_per_token" in row:
                value = f"{row['prefill_32_seconds']:.3f} | {row['seconds_per_token']:.4f}"
            else:
                value = f"failed: {row['error']} |"
            lines.append(f"| {row['configuration']} | {value} | {row.get('kernels', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", default=None, help="a 4-bit-loadable checkpoint for the decode table")
    parser.add_argument("--rows", type=lambda text: [int(v) for v in text.split(",")], default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "cpu_4bit_kernel"))
    parser.add_argument("--_decode_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._decode_child:
        print(json.dumps(decode_child(args._decode_child, args.steps)))
        return {}
    results = {"machine": machine(), "projections": measure_projections(args.rows)}
    if args.checkpoint_dir:
        results["checkpoint"] = Path(args.checkpoint_dir).name
        results["decode"] = measure_decode(args.checkpoint_dir, args.steps)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    output.with_suffix(".md").write_text(render(results))
    print(f"wrote {output.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
