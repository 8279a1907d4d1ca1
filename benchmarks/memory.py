"""Memory of DeepSeekMoE in bf16, 8-bit and 4-bit: computed per component, and measured on a GPU.

    python benchmarks/memory.py                      # computed table; measured too when a CUDA GPU is present
    python benchmarks/memory.py --device cuda --precisions nf4-dq --checkpoint-dir /data/random-16b

Computed: the weight bytes per component (routed experts / shared experts + dense MLPs / attention / embeddings +
lm_head / routers + norms) of the config (default deepseek-moe-16b) in bf16, 8-bit, 4-bit nf4 and 4-bit nf4 with
double quantization, bitsandbytes statistics included (`modeling_deepseekmoe.footprint`).

Measured (`--device cuda`, needs a GPU): random weights for the config are written in the released layout (bf16,
`write_random_released_checkpoint`; ~33 GB of disk at 16B, reused with `--checkpoint-dir`), then, for each precision,
the peak GPU memory (`torch.cuda.max_memory_allocated`) of `from_pretrained(..., device_map={"": "cuda"})` and of one
forward over `--tokens` tokens with `logits_to_keep=1` (bf16 activations, sdpa attention, the default experts
implementation: grouped_mm on the dequantized experts). Results go to `benchmarks/results/memory_<device>.md`
(`memory_<device>_<precisions>.md` for a partial run).
Without a GPU the computed table is written to `benchmarks/results/memory_cpu_computed.md` and the measurement is
skipped. A full 16B run (write + 4 loads) can take longer than 10 minutes: split it with `--precisions` and reuse the
checkpoint with `--checkpoint-dir`.
"""

import argparse
import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_deepseekmoe.footprint import PRECISION_LABELS, PRECISIONS, format_footprint, load_config, memory_footprint
from modeling_deepseekmoe import DeepseekMoEConfig
from modeling_deepseekmoe.checkpoint import write_random_released_checkpoint
from modeling_deepseekmoe.loading import PRECISION_FLAGS, QuantizationArguments


RESULTS_DIR = Path(__file__).parent / "results"
TARGET_4BIT_GB = 11.0


# Each measured precision as the project's loading flags: the 4-bit rows are `--load_in_4bit` as every command means
# it (nf4, double quantization unless switched off), in a bf16 compute dtype.


def quantization_config(precision: str):
    """The `BitsAndBytesConfig` each measured precision loads with (None: plain bf16), from the project's one builder
    (`modeling_deepseekmoe.loading.quantization_config`)."""
    if precision not in PRECISION_FLAGS:
        raise ValueError(f"Unknown precision {precision!r}; use one of {list(PRECISION_FLAGS)}.")
    return QuantizationArguments(**PRECISION_FLAGS[precision]).bnb_config(dtype=torch.bfloat16)


@dataclass
class Measurement:
    precision: str
    load_peak: int  # bytes, peak allocated during from_pretrained
    forward_peak: int  # bytes, peak allocated during the forward
    resident: int  # bytes allocated once loaded
    reserved_peak: int  # bytes, peak reserved by the caching allocator over load and forward
    load_seconds: float
    forward_seconds: float


def measure(checkpoint_dir: Path, precision: str, tokens: int, device: str = "cuda") -> Measurement:
    """Load the checkpoint at `precision` on `device` and run one forward over `tokens` tokens."""
    from transformers import AutoModelForCausalLM

    import modeling_deepseekmoe  # noqa: F401  (registers the model type)

    _release(device)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint_dir,
        dtype=torch.bfloat16,
        device_map={"": device},
        quantization_config=quantization_config(precision),
    )
    _synchronize(device)
    load_seconds = time.perf_counter() - start
    load_peak, resident, load_reserved = _peak(device), _allocated(device), _reserved_peak(device)

    _reset_peak(device)
    input_ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids, logits_to_keep=1, use_cache=False)
    _synchronize(device)
    forward_seconds = time.perf_counter() - start
    forward_peak = _peak(device)
    reserved_peak = max(load_reserved, _reserved_peak(device))
    del model
    _release(device)
    return Measurement(precision, load_peak, forward_peak, resident, reserved_peak, load_seconds, forward_seconds)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def _reserved_peak(device: str) -> int:
    return torch.cuda.max_memory_reserved() if device.startswith("cuda") else 0


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


SETTINGS = (
    "Settings: `dtype=torch.bfloat16`; 8-bit = `--load_in_8bit` (LLM.int8, threshold 6.0); 4-bit = `--load_in_4bit` "
    "(nf4, bf16 compute) with `--use_bnb_nested_quant false`, and as is (double quantization) for the double-quant "
    "row: the configs of `modeling_deepseekmoe.loading.quantization_config`. Embeddings, lm_head, routers and norms "
    "stay bf16."
)


def forward_overhead_note(config: DeepseekMoEConfig) -> str:
    """What a quantized forward adds to the weights: one MoE layer's routed experts dequantized at a time."""
    layer_bytes = 2 * 3 * config.n_routed_experts * config.hidden_size * config.moe_intermediate_size
    return (
        f"A quantized forward on a GPU also holds one MoE layer's routed experts dequantized to bf16 at a time "
        f"({layer_bytes / 1e9:.2f} GB here), plus activations."
    )


def measurement_row(m: Measurement) -> str:
    gigabytes = [f"{value / 1e9:.2f}" for value in (m.resident, m.load_peak, m.forward_peak, m.reserved_peak)]
    cells = [PRECISION_LABELS[m.precision], *gigabytes]
    return "| " + " | ".join(cells + [f"{m.load_seconds:.0f}", f"{m.forward_seconds:.2f}"]) + " |"


def format_measurements(measurements: list[Measurement], device_name: str, tokens: int) -> str:
    lines = [
        f"Measured on {device_name}, torch {torch.__version__}: peak `torch.cuda.max_memory_allocated` (GB = 10^9 "
        f"bytes) of loading a random-weight checkpoint in the released layout and of one forward over {tokens} "
        "tokens (batch 1, `logits_to_keep=1`, bf16 activations, sdpa, default experts implementation).",
        "",
        SETTINGS,
        "",
        "| precision | resident after load | peak during load | peak during forward | peak reserved | load s "
        "| forward s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [measurement_row(m) for m in measurements]
    four_bit = [m for m in measurements if m.precision.startswith("nf4")]
    if four_bit:
        best = min(max(m.load_peak, m.forward_peak) for m in four_bit)
        verdict = "meets" if best / 1e9 < TARGET_4BIT_GB else "misses"
        lines += ["", f"4-bit peak {best / 1e9:.2f} GB {verdict} the {TARGET_4BIT_GB:.0f} GB target."]
    return "\n".join(lines)


def write_results(path: Path, sections: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(["# DeepSeekMoE memory (`benchmarks/memory.py`)", *sections]) + "\n")
    return path


def run(
    config: DeepseekMoEConfig,
    device: str,
    precisions: tuple[str, ...] = PRECISIONS,
    tokens: int = 2048,
    checkpoint_dir: Path | None = None,
    results_dir: Path = RESULTS_DIR,
) -> Path:
    """Print the computed table, measure on `device` when it is a CUDA GPU, and write the results file."""
    computed = format_footprint(memory_footprint(config)) + "\n\n" + forward_overhead_note(config)
    print(computed)
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        reason = "no CUDA device is available" if device.startswith("cuda") else f"--device {device} is not a GPU"
        skipped = f"Skipped the measurement: {reason}; the table above is computed from the config."
        print("\n" + skipped)
        measured = f"## Measured\n\n{skipped} Run `python benchmarks/memory.py` on a CUDA GPU."
        sections = ["## Computed", computed, measured]
        return write_results(results_dir / "memory_cpu_computed.md", sections)

    device_name = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as scratch:
        directory = checkpoint_dir or Path(scratch) / "random-checkpoint"
        if not (directory / "config.json").is_file():
            print(f"\nWriting random bf16 weights in the released layout to {directory} ...", flush=True)
            write_random_released_checkpoint(config, directory, dtype=torch.bfloat16)
        measurements = []
        for precision in precisions:
            print(f"Measuring {PRECISION_LABELS[precision]} ...", flush=True)
            measurements.append(measure(directory, precision, tokens))
            print(measurement_row(measurements[-1]), flush=True)
    measured = format_measurements(measurements, device_name, tokens)
    print("\n" + measured)
    slug = device_name.lower().replace("nvidia", "").strip().replace(" ", "-")
    if precisions != PRECISIONS:  # a partial run does not overwrite the full table
        slug += "_" + "-".join(precisions)
    sections = ["## Measured", measured, "## Computed", computed]
    return write_results(results_dir / f"memory_{slug}.md", sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="model directory, config.json or hub id (default: deepseek-moe-16b)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated, from {PRECISIONS}")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--checkpoint-dir", type=Path, help="reuse (or write once to) this random checkpoint")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision(s) {unknown}; choose from {PRECISIONS}")
    path = run(load_config(args.config), args.device, precisions, args.tokens, args.checkpoint_dir, args.results_dir)
    print(f"\nWrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
