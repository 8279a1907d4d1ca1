"""The released 16B at full size on this machine: write, check, load (nf4 / nf4+dq / int8), forward, decode.

    python benchmarks/full_size.py --checkpoint_dir /data/random-16b          # ~33 GB of disk, reused when present
    python benchmarks/full_size.py --checkpoint_dir /tmp/r --num_hidden_layers 3 --precisions nf4   # a shallow check

Random weights are written at the released 16B config in the released layout (bf16, 7 safetensors shards, one tensor
per expert projection; `write_random_released_checkpoint`, which writes tensor by tensor: memory holds one tensor).
Then each measurement runs in its own process (so that one's peak memory is not another's): the checkpoint check
(`deepseekmoe convert CKPT`'s), and per precision a load through the project's one loader
(`modeling_deepseekmoe.loading.load_pretrained_model`), a `--tokens`-token forward and a greedy `generate` of
`--new_tokens` tokens (s/token: the median time between decode steps). Peak memory is sampled from /proc (anonymous,
resident file pages, and their sum), next to the kernel's high-water RSS. `--precisions bf16-offload` loads bf16 with
`device_map="auto"` and an `offload_folder` on a machine whose RAM is smaller than the model.

The decode bound: a step reads each weight it uses once (embedding row, attention, layer 0's MLP, shared experts, the
top-k routed experts of every MoE layer, the router, lm_head), so s/token >= those bytes / the memory bandwidth, which
is measured here as the best of 5 sums of a 1 GiB fp32 tensor with every thread.

Results: `benchmarks/results/full_size_<device>.json` and `.md` (machine, CPU flags, bandwidth, versions). Phase
timings are printed as they finish. On CPU the default run (write + check + nf4 + nf4-dq + int8) takes ~45 minutes
on 2 cores.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


RESULTS_DIR = Path(__file__).parent / "results"
PRECISIONS = ("nf4", "nf4-dq", "int8", "bf16", "bf16-offload")
DEFAULT_PRECISIONS = ("nf4", "nf4-dq", "int8")
GB = 1e9


# --- memory -----------------------------------------------------------------------------------------------------------


def _status_kb(fields: tuple[str, ...]) -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in fields:
                values[name] = int(rest.split()[0]) * 1024
    return values


class PeakMemory:
    """Samples /proc/self/status every `interval` s: peak anonymous memory, resident file pages, and their sum."""

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, {"anon": 0, "file": 0, "total": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        values = _status_kb(self.FIELDS)
        anon, mapped = values.get("RssAnon", 0), values.get("RssFile", 0)
        self.peak = {"anon": max(self.peak["anon"], anon), "file": max(self.peak["file"], mapped),
                     "total": max(self.peak["total"], anon + mapped)}  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict[str, float]:
        return {f"peak_{key}_gb": value / GB for key, value in self.peak.items()} | {
            "high_water_rss_gb": _status_kb(("VmHWM",)).get("VmHWM", 0) / GB
        }


def memory_bandwidth_gbs(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth of a sum over a `size_bytes` fp32 tensor (best of `repeats`), GB/s, with torch's threads."""
    data = torch.ones(size_bytes // 4)
    data.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best / GB


def decode_bytes_per_token(config, precision: str) -> int:
    """Bytes of the weights one decode step reads (see the module docstring), in `precision`'s storage: the footprint
    table's components, with the routed experts scaled to the top-k of each layer and, of the embeddings, lm_head
    plus one row."""
    from modeling_deepseekmoe.footprint import UNQUANTIZED_BYTES, memory_footprint

    storage = {"bf16-offload": "bf16"}.get(precision, precision)
    table = memory_footprint(config)
    components = {component.name: component.bytes(storage) for component in table.components}
    routed = components.pop("routed experts") * config.num_experts_per_tok // config.n_routed_experts
    embeddings = components.pop("embeddings + lm_head")
    if not config.tie_word_embeddings:
        embeddings //= 2  # the lm_head half; the embedding's one row is added below
    return routed + embeddings + UNQUANTIZED_BYTES * config.hidden_size + sum(components.values())


# --- the measurements, each in its own process -----------------------------------------------------------------------


def loading_options(precision: str, offload_folder: str | None, max_memory_gb: float | None) -> dict:
    from modeling_deepseekmoe.loading import PRECISION_FLAGS, QuantizationArguments

    if precision == "bf16-offload":
        options = {"device_map": "auto", "offload_folder": offload_folder}
        if max_memory_gb is not None:
            options["max_memory"] = {"cpu": f"{max_memory_gb}GB"}
        return options
    return {"quantization": QuantizationArguments(**PRECISION_FLAGS[precision])}


def measure_check(checkpoint_dir: str) -> dict:
    from modeling_deepseekmoe import DeepseekMoEConfig
    from modeling_deepseekmoe.checkpoint import checkpoint_tensor_files, validate_checkpoint

    with PeakMemory() as peak:
        start = time.perf_counter()
        config = DeepseekMoEConfig.from_pretrained(checkpoint_dir)
        validate_checkpoint(checkpoint_dir, config)
        seconds = time.perf_counter() - start
    files = checkpoint_tensor_files(checkpoint_dir)
    parameters = sum(int(torch.Size(shape).numel()) for shape in _shapes(config).values())
    summary = {"tensors": len(files), "shards": len(set(files.values())), "parameters": parameters}
    return {"seconds": seconds, **summary, **peak.report()}


class _StepTimes:
    """A `StoppingCriteria` that never stops and records when each generation step ended."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def measure_precision(checkpoint_dir: str, precision: str, tokens: int, new_tokens: int,
                      offload_folder: str | None = None, max_memory_gb: float | None = None) -> dict:  # fmt: skip
    from transformers import StoppingCriteriaList

    from modeling_deepseekmoe.footprint import measured_footprint
    from modeling_deepseekmoe.loading import load_pretrained_model

    result: dict = {"precision": precision}
    with PeakMemory() as peak:
        start = time.perf_counter()
        model = load_pretrained_model(checkpoint_dir, dtype=torch.bfloat16,
                                      **loading_options(precision, offload_folder, max_memory_gb))  # fmt: skip
        result["load_seconds"] = time.perf_counter() - start
    result.update({f"load_{key}": value for key, value in peak.report().items()})
    result["footprint_gb"] = measured_footprint(model) / GB
    print(f"[{precision}] loaded in {result['load_seconds']:.1f} s, peak {result['load_peak_total_gb']:.2f} GB "
          f"(anon {result['load_peak_anon_gb']:.2f}), footprint {result['footprint_gb']:.2f} GB", flush=True)  # fmt: skip
    model.eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size - 200, (1, tokens), generator=generator)
    with PeakMemory() as peak, torch.inference_mode():
        start = time.perf_counter()
        model(input_ids, logits_to_keep=1)
        result["forward_seconds"] = time.perf_counter() - start  # the first call also packs the 4-bit weights
        start = time.perf_counter()
        model(input_ids, logits_to_keep=1)
        result["forward_warm_seconds"] = time.perf_counter() - start
        steps = _StepTimes()
        start = time.perf_counter()
        model.generate(input_ids[:, :8], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([steps]))  # fmt: skip
        result["generate_seconds"] = time.perf_counter() - start
    intervals = [later - earlier for earlier, later in zip(steps.times, steps.times[1:])]
    result["seconds_per_token"] = statistics.median(intervals) if intervals else float("nan")
    result["first_token_seconds"] = steps.times[0] - start if steps.times else float("nan")
    result.update({f"run_{key}": value for key, value in peak.report().items()})
    print(f"[{precision}] {tokens}-token forward {result['forward_seconds']:.2f} s (again: "
          f"{result['forward_warm_seconds']:.2f} s), decode "
          f"{result['seconds_per_token']:.3f} s/token", flush=True)  # fmt: skip
    return result


def run_child(args: argparse.Namespace, phase: str, precision: str | None = None) -> dict:
    """Run one measurement in a fresh process; its result, or the one-line error it ended with."""
    command = [sys.executable, __file__, "--_child", phase, "--checkpoint_dir", args.checkpoint_dir,
               "--tokens", str(args.tokens), "--new_tokens", str(args.new_tokens)]  # fmt: skip
    if precision:
        command += ["--precisions", precision]
    if args.offload_folder:
        command += ["--offload_folder", args.offload_folder]
    if args.max_memory_gb is not None:
        command += ["--max_memory_gb", str(args.max_memory_gb)]
    start = time.perf_counter()
    stderr = Path(args.checkpoint_dir).parent / f".full_size_{phase}_{precision or ''}.stderr"
    with open(stderr, "w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        lines = []
        for line in process.stdout:
            if line.startswith("RESULT "):
                lines.append(line)
            else:
                print(line, end="", flush=True)
        process.wait(timeout=args.phase_timeout)
    if process.returncode == 0 and lines:
        result = json.loads(lines[-1].removeprefix("RESULT "))
    else:
        tail = (stderr.read_text().strip().splitlines() or ["(no output)"])[-1]
        killed = process.returncode in (-9, 137)
        result = {"error": ("killed (out of memory?)" if killed else tail), "returncode": process.returncode}
    stderr.unlink()
    result["phase_seconds"] = time.perf_counter() - start
    return result


def child_main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    if args._child == "check":
        result = measure_check(args.checkpoint_dir)
    else:
        result = measure_precision(args.checkpoint_dir, args.precisions[0], args.tokens, args.new_tokens,
                                   args.offload_folder, args.max_memory_gb)  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


# --- the report -------------------------------------------------------------------------------------------------------


def machine_description() -> dict:
    from modeling_deepseekmoe.environment import collect_environment

    report = collect_environment()
    with open("/proc/meminfo") as handle:
        report["memory"] = handle.readline().split(":")[1].strip()
    report["cpu count"] = str(os.cpu_count())
    report["torch threads"] = str(torch.get_num_threads())
    return report


def render(results: dict) -> str:
    lines = [
        f"# The 16B at full size on {results['device']} (`benchmarks/full_size.py`)",
        "",
        f"Generated {results['date']}; {results['config']}.",
        "",
        "Machine and versions:",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in results["machine"].items()]
    lines += ["", f"Memory bandwidth (best 1 GiB fp32 sum): **{results['bandwidth_gbs']:.1f} GB/s**. Load average "
              f"(1/5/15 min) at the start {_loads(results['load_average_start'])}, at the end "
              f"{_loads(results['load_average_end'])} (above the core count, other processes shared the CPU and the "
              "times are inflated).", ""]
    if "write" in results:
        write = results["write"]
        lines += [f"Write of the random checkpoint: {write['seconds']:.0f} s, {write['bytes'] / GB:.2f} GB.", ""]
    if "check" in results:
        check = results["check"]
        if "error" in check:
            lines += [f"Checkpoint check: failed: {check['error']}", ""]
        else:
            lines += [f"Checkpoint check: {check['seconds']:.1f} s, {check['tensors']} tensors in {check['shards']} "
                      f"shards, {check['parameters'] / 1e9:.2f}B parameters, peak {check['peak_total_gb']:.2f} GB.", ""]  # fmt: skip
    header = ["precision", "load (s)", "load peak anon+file (GB)", "load peak anon (GB)", "high-water RSS (GB)",
              "footprint (GB)", "bound: footprint + 2 GB", f"{results['tokens']}-token forward, first / again (s)",
              "decode (s/token)", "bandwidth bound (s/token)", "x bound"]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["precisions"]:
        if "error" in row:
            lines.append(f"| {row['precision']} | failed: {row['error']} |" + " |" * (len(header) - 2))
            continue
        bound = row["bytes_per_token"] / GB / results["bandwidth_gbs"]
        cells = [row["precision"], f"{row['load_seconds']:.0f}", f"{row['load_peak_total_gb']:.2f}",
                 f"{row['load_peak_anon_gb']:.2f}", f"{row['load_high_water_rss_gb']:.2f}",
                 f"{row['footprint_gb']:.2f}",
                 _bound_held(row),
                 f"{row['forward_seconds']:.2f} / {row['forward_warm_seconds']:.2f}",
                 f"{row['seconds_per_token']:.3f}", f"{bound:.3f}",
                 f"{row['seconds_per_token'] / bound:.1f}x"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Peak memory is the process's own (sampled every 50 ms from /proc/self/status: RssAnon + RssFile); the "
        "high-water RSS is the kernel's VmHWM. The bound is the weight bytes a decode step reads over the measured "
        "bandwidth (see the script's docstring). Decode: greedy `generate` from an 8-token prompt, the median time "
        "between steps.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", required=True, help="where the random checkpoint is (written if absent)")
    parser.add_argument("--num_hidden_layers", type=int, default=None, help="a shallower model (default: 28)")
    parser.add_argument("--tiny", action="store_true", help="toy dims, to check the code paths in seconds")
    parser.add_argument("--precisions", type=lambda text: text.split(","), default=list(DEFAULT_PRECISIONS),
                        help=f"comma-separated, from {','.join(PRECISIONS)}")  # fmt: skip
    parser.add_argument("--skip_check", action="store_true")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=8)
    parser.add_argument("--offload_folder", default=None, help="for bf16-offload (default: CHECKPOINT_offload)")
    parser.add_argument("--max_memory_gb", type=float, default=None, help="CPU memory cap for bf16-offload")
    parser.add_argument("--phase_timeout", type=float, default=3600)
    parser.add_argument("--output", default=None, help="results file stem (default: results/full_size_cpu)")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    if args._child:
        child_main(args)
        return {}

    from modeling_deepseekmoe import DeepseekMoEConfig
    from modeling_deepseekmoe.checkpoint import SAFE_INDEX, write_random_released_checkpoint

    if args.tiny:
        config = DeepseekMoEConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                   num_hidden_layers=args.num_hidden_layers or 3, num_attention_heads=4,
                                   num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                                   n_shared_experts=1, bos_token_id=0, eos_token_id=1)  # fmt: skip
    else:
        config = DeepseekMoEConfig(**({"num_hidden_layers": args.num_hidden_layers} if args.num_hidden_layers else {}))
    args.offload_folder = args.offload_folder or args.checkpoint_dir.rstrip("/") + "_offload"
    results: dict = {
        "device": "cpu",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.n_routed_experts} routed "
                   f"experts top-{config.num_experts_per_tok} of width {config.moe_intermediate_size}"),  # fmt: skip
        "machine": machine_description(),
        "tokens": args.tokens,
        "new_tokens": args.new_tokens,
        "load_average_start": os.getloadavg(),
    }
    results["bandwidth_gbs"] = memory_bandwidth_gbs(1 << 26 if args.tiny else 1 << 30)
    print(f"memory bandwidth {results['bandwidth_gbs']:.1f} GB/s", flush=True)
    directory = Path(args.checkpoint_dir)
    if not (directory / SAFE_INDEX).is_file():
        from tqdm.auto import tqdm

        total = sum(int(torch.Size(s).numel()) * 2 for s in _shapes(config).values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing random checkpoint") as bar:
            start = time.perf_counter()
            write_random_released_checkpoint(config, directory, dtype=torch.bfloat16,
                                             max_shard_bytes=_released_shard_bytes(total), progress=bar.update)  # fmt: skip
        results["write"] = {"seconds": time.perf_counter() - start, "bytes": total}
        print(f"wrote {total / GB:.2f} GB in {results['write']['seconds']:.0f} s", flush=True)
    if not args.skip_check:
        results["check"] = run_child(args, "check")
        print(f"check: {results['check']}", flush=True)
    results["precisions"] = []
    for precision in args.precisions:
        row = run_child(args, "load", precision)
        row.setdefault("precision", precision)
        row["bytes_per_token"] = decode_bytes_per_token(config, precision)
        results["precisions"].append(row)
        print(f"{precision}: {row}", flush=True)
    results["load_average_end"] = os.getloadavg()
    stem = Path(args.output) if args.output else RESULTS_DIR / "full_size_cpu"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(results))
    print(f"wrote {stem.with_suffix('.md')}")
    return results


def _bound_held(row: dict) -> str:
    if row["precision"] not in ("nf4", "nf4-dq", "int8"):
        return "–"  # the bound is the quantized loads' (bf16 offload keeps up to max_memory in RAM by design)
    return "held" if row["load_peak_total_gb"] <= row["footprint_gb"] + 2 else "**not held**"


def _loads(values) -> str:
    return "/".join(f"{value:.1f}" for value in values)


def _shapes(config):
    from modeling_deepseekmoe.checkpoint import released_tensor_shapes

    return released_tensor_shapes(config)


def _released_shard_bytes(total: int) -> int:
    # The released repos have 7 shards of <= ~4.9 GB.
    return max(1 << 20, -(-total // 7) + (1 << 20))


if __name__ == "__main__":
    main()
