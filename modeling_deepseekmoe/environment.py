"""What a bug report needs to know about the machine and the installed stack (`deepseekmoe env`), in the spirit of
`transformers env` / `accelerate env`: package versions, the CPU's capabilities, GPUs, and which experts
implementation and 4-bit kernel path a DeepSeekMoE model would use here."""

import importlib.metadata
import platform
import sys

import torch

from . import experts_kernels


# Distribution names, in the order a report lists them.
PACKAGES = (
    "deepseekmoe",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "bitsandbytes",
    "lm_eval",
    "datasets",
    "safetensors",
    "tokenizers",
    "huggingface_hub",
    "deepspeed",
)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capabilities() -> dict[str, str]:
    """The CPU's vector ISA as torch sees it, and whether bf16 / fp16 GEMMs run natively or are emulated."""
    capability = torch.backends.cpu.get_cpu_capability()
    bf16_native = hasattr(torch.cpu, "_is_avx512_bf16_supported") and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )
    return {
        "cpu": cpu_model_name(),
        "cpu capability (torch)": capability,
        "torch threads": str(torch.get_num_threads()),
        "cpu bf16 matmul": "native (AVX512-BF16 / AMX)" if bf16_native else "emulated",
        "cpu bf16 experts GEMMs": (
            "fp32 GEMMs on upcast operands (faster than emulated bf16)"
            if experts_kernels._emulates_low_precision_matmul(torch.bfloat16)
            else "bf16"
        ),
    }


def gpu_summary() -> dict[str, str]:
    if not torch.cuda.is_available():
        return {"gpu": "none visible"}
    names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return {"gpu": f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names), "cuda": torch.version.cuda}


def experts_implementation_choice() -> str:
    """What the default experts implementation (`"auto"`) runs on the device a model would be placed on here."""
    if torch.cuda.is_available():
        return "auto -> grouped_mm on the GPU (no host syncs); sorted_loop for CPU-resident layers"
    return "auto -> sorted_loop on the CPU (a traceable path under torch.compile / torch.export)"


def bitsandbytes_summary() -> dict[str, str]:
    version = package_version("bitsandbytes")
    if version == "not installed":
        return {"bitsandbytes": "not installed (4-bit / 8-bit loading unavailable)"}
    from . import quantization

    summary = {"bitsandbytes backend": "cuda" if torch.cuda.is_available() else "cpu"}
    summary["4-bit kernel (CPU)"] = quantization.describe_cpu_4bit_kernels()
    return summary


def collect_environment() -> dict[str, str]:
    report = {"python": sys.version.split()[0], "platform": platform.platform()}
    report.update({name: package_version(name) for name in PACKAGES})
    if torch.version.cuda is None:
        report["torch"] += " (CPU build)"
    report.update(cpu_capabilities())
    report.update(gpu_summary())
    report["experts implementation"] = experts_implementation_choice()
    report.update(bitsandbytes_summary())
    return report


def format_environment(report: dict[str, str]) -> str:
    return "\n".join(f"- {key}: {value}" for key, value in report.items())
