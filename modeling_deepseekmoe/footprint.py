"""How much memory a DeepSeekMoE's weights take in bf16, 8-bit and 4-bit, per component, computed from its config
alone (no download), the way `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` stores them:

- quantized (bitsandbytes): every projection of the routed experts, shared experts, dense MLPs and attention;
- kept in the compute dtype (bf16): embeddings, lm_head, routers and norms.

`memory_footprint(config) -> FootprintTable`, `format_footprint(table) -> str` (markdown), and
`measured_footprint(model)` (the bytes a loaded model really holds, bitsandbytes statistics included, which
`model.get_memory_footprint()` leaves out). The command: `deepseekmoe footprint`.
"""

import math
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
