"""How much memory a DeepSeekMoE's weights take in bf16, 8-bit and 4-bit, per component, computed from its config
alone (no download), the way `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` stores them:

- quantized (bitsandbytes): every projection of the routed experts, shared experts, dense MLPs and attention;
- kept in the compute dtype (bf16): embeddings, lm_head, routers and norms.

`memory_footprint(config) -> FootprintTable`, `format_footprint(table) -> str` (markdown), and
`measured_footprint(model)` (the bytes a loaded model really holds, bitsandbytes statistics included, which
`model.get_memory_footprint()` leaves out). The command: `deepseekmoe footprint`.
"""

import math
from pathlib import Path
from dataclasses import dataclass, field

import torch

from .configuration_deepseekmoe import DeepseekMoEConfig


# Storage formats, in the order the table shows them.
PRECISIONS = ("bf16", "int8", "nf4", "nf4-dq")
PRECISION_LABELS = {
    "bf16": "bf16",
    "int8": "8-bit (LLM.int8)",
    "nf4": "4-bit nf4",
    "nf4-dq": "4-bit nf4 + double quant",
}
BLOCKSIZE_4BIT = 64  # bitsandbytes' default 4-bit block
BLOCKSIZE_NESTED = 256  # double quantization of the absmax, in blocks of 256
UNQUANTIZED_BYTES = 2  # bf16 / fp16 compute dtype


def quantized_matrix_bytes(out_features: int, in_features: int, precision: str) -> int:
    """Bytes bitsandbytes holds for one `[out, in]` weight, statistics included."""
    numel = out_features * in_features
    if precision == "bf16":
        return 2 * numel
    if precision == "int8":
        return numel + 4 * out_features  # int8 weight + fp32 row scale (SCB)
    blocks = math.ceil(numel / BLOCKSIZE_4BIT)
    packed_and_code = math.ceil(numel / 2) + 16 * 4  # two weights per byte + the 16-entry fp32 code
    if precision == "nf4":
        return packed_and_code + 4 * blocks  # fp32 absmax per block
    if precision == "nf4-dq":
        # uint8 absmax per block, fp32 absmax per 256 blocks, the 256-entry fp32 code and an fp32 offset
        return packed_and_code + blocks + 4 * math.ceil(blocks / BLOCKSIZE_NESTED) + 256 * 4 + 4
    raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")


@dataclass
class Component:
    name: str
    quantized: bool
    matrices: list[tuple[int, int]] = field(default_factory=list)  # [out, in] of each projection
    other_parameters: int = 0  # parameters kept in the compute dtype

    @property
    def parameters(self) -> int:
        return sum(out * inp for out, inp in self.matrices) + self.other_parameters

    def bytes(self, precision: str) -> int:
        unquantized = UNQUANTIZED_BYTES * self.other_parameters
        if not self.quantized or precision == "bf16":
            return UNQUANTIZED_BYTES * self.parameters
        return unquantized + sum(quantized_matrix_bytes(out, inp, precision) for out, inp in self.matrices)


@dataclass
class FootprintTable:
    config_summary: str
    components: list[Component]

    @property
    def parameters(self) -> int:
        return sum(component.parameters for component in self.components)

    def bytes(self, precision: str, component: str | None = None) -> int:
        return sum(c.bytes(precision) for c in self.components if component is None or c.name == component)

    def bits_per_weight(self, precision: str, component: str) -> float:
        chosen = next(c for c in self.components if c.name == component)
        return 8 * chosen.bytes(precision) / chosen.parameters


def _mlp(hidden: int, width: int) -> list[tuple[int, int]]:
    return [(width, hidden), (width, hidden), (hidden, width)]


def memory_footprint(config: DeepseekMoEConfig) -> FootprintTable:
    """Weight memory per component of a DeepSeekMoE described by `config`, in every storage format of `PRECISIONS`."""
    hidden, head_dim = config.hidden_size, config.head_dim
    routed = Component("routed experts", quantized=True)
    dense = Component("shared experts + dense MLPs", quantized=True)
    attention = Component("attention", quantized=True)
    embeddings = Component("embeddings + lm_head", quantized=False)
    other = Component("routers + norms", quantized=False)

    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    for layer in range(config.num_hidden_layers):
        attention.matrices += [(q_out, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, q_out)]
        if config.attention_bias:
            attention.other_parameters += q_out + 2 * kv_out + hidden
        other.other_parameters += 2 * hidden  # input and post-attention RMSNorm
        if not config.is_moe_layer(layer):
            dense.matrices += _mlp(hidden, config.intermediate_size)
            continue
        other.other_parameters += config.n_routed_experts * hidden  # router
        routed.matrices += _mlp(hidden, config.moe_intermediate_size) * config.n_routed_experts
        if config.n_shared_experts:
            dense.matrices += _mlp(hidden, config.n_shared_experts * config.moe_intermediate_size)
    other.other_parameters += hidden  # final norm
    heads = 1 if config.tie_word_embeddings else 2
    embeddings.other_parameters = heads * config.vocab_size * hidden

    summary = (
        f"{config.num_hidden_layers} layers, hidden {hidden}, {config.n_routed_experts} routed experts "
        f"(top-{config.num_experts_per_tok}) of width {config.moe_intermediate_size}, "
        f"{config.n_shared_experts or 0} shared, vocab {config.vocab_size}"
    )
    return FootprintTable(summary, [routed, dense, attention, embeddings, other])


def _gb(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f}"


def format_footprint(table: FootprintTable) -> str:
    """The table as markdown: GB (10^9 bytes) per component and storage format, and bits per routed-expert weight."""
    header = ["component", "parameters"] + [f"{PRECISION_LABELS[p]} (GB)" for p in PRECISIONS]
    lines = [
        f"Weight memory of DeepSeekMoE ({table.config_summary}); bitsandbytes statistics included, "
        "embeddings / lm_head / routers / norms kept in bf16.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for component in table.components:
        cells = [component.name, f"{component.parameters / 1e9:.3f}B"]
        cells += [_gb(component.bytes(precision)) for precision in PRECISIONS]
        lines.append("| " + " | ".join(cells) + " |")
    total = ["**total**", f"{table.parameters / 1e9:.3f}B"] + [f"**{_gb(table.bytes(p))}**" for p in PRECISIONS]
    lines.append("| " + " | ".join(total) + " |")
    bits = ", ".join(f"{PRECISION_LABELS[p]} {table.bits_per_weight(p, 'routed experts'):.3f}" for p in PRECISIONS)
    lines += ["", f"Bits per routed-expert weight: {bits}."]
    return "\n".join(lines)


def measured_footprint(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of a loaded model, plus the bitsandbytes statistics of its quantized
    weights (absmax, codes, row scales), which `get_memory_footprint()` does not count."""
    seen: set[int] = set()
    total = 0

    def add(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            for value in (quant_state.absmax, quant_state.code, quant_state.offset):
                add(value)
            if quant_state.state2 is not None:
                add(quant_state.state2.absmax)
                add(quant_state.state2.code)
        add(getattr(tensor, "SCB", None))
    return total


def load_config(path: str | None) -> DeepseekMoEConfig:
    """`DeepseekMoEConfig` from a directory / config.json / hub id, or deepseek-moe-16b when `path` is None."""
    if path is None:
        return DeepseekMoEConfig()
    if path.endswith(".json"):
        return DeepseekMoEConfig.from_json_file(path)
    return DeepseekMoEConfig.from_pretrained(path)


# Memory a loaded model needs beyond its weights before the load is refused: the interpreter, torch and transformers
# (~0.5 GB) and a forward's activations.
LOAD_HEADROOM_BYTES = 1_500_000_000


def available_memory_bytes() -> int | None:
    """Memory this process can still take: the kernel's MemAvailable, capped by a cgroup (v2 or v1) limit; None where
    neither can be read (not Linux)."""
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        return None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            room = int(limit) - int(usage)
            available = room if available is None else min(available, room)
        break
    return available


class InsufficientMemoryError(ValueError):
    """The weights would not fit in the memory left; raised before any weight is read."""


def check_fits_in_memory(config: DeepseekMoEConfig, precision: str, bytes_per_weight_scale: float = 1.0,
                         available: int | None = None) -> None:  # fmt: skip
    """Refuse a load whose weights (`precision`'s footprint, times `bytes_per_weight_scale` for fp32) plus
    `LOAD_HEADROOM_BYTES` exceed the available memory, naming the precisions that would fit."""
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    table = memory_footprint(config)
    needed = int(table.bytes(precision) * bytes_per_weight_scale)
    if needed + LOAD_HEADROOM_BYTES <= available:
        return
    fits = [
        f"{flag} ({_gb(table.bytes(name))} GB)"
        for name, flag in (("int8", "--load_in_8bit"), ("nf4-dq", "--load_in_4bit"))
        if table.bytes(name) + LOAD_HEADROOM_BYTES <= available
    ]
    label = "float32" if bytes_per_weight_scale == 2 else PRECISION_LABELS[precision]
    advice = f"load it with {' or '.join(fits)}, or" if fits else "nothing fits here; use a machine with more RAM or"
    raise InsufficientMemoryError(
        f"The model's weights need {_gb(needed)} GB in {label} but only {_gb(available)} GB of memory is available: "
        f"{advice} pass device_map='auto' with offload_folder=DIR to offload what does not fit to disk (slow)."
    )
