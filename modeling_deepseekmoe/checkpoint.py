"""The released checkpoint layout: which tensors a DeepSeekMoE checkpoint holds, checking a directory against it, and
writing random weights in it (for tests and for full-size benchmarks without a download).

Released layout: `config.json` (`model_type: "deepseek"`), sharded `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json` (older repos: `pytorch_model-*.bin` + `pytorch_model.bin.index.json`), one tensor per
expert projection: `model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration_deepseekmoe import DeepseekMoEConfig


SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"

# The remote-code entry points a released config.json carries; kept so the reference code can still load our saves.
RELEASED_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}


class CheckpointError(ValueError):
    """A checkpoint directory does not match the released layout or its config."""


def released_tensor_shapes(config: DeepseekMoEConfig, with_lm_head: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a released-layout checkpoint for `config`, with its shape ([out, in] for projections)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if with_lm_head and not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        for name, out_dim in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[f"{prefix}.self_attn.{name}.weight"] = (out_dim, hidden)
            if config.attention_bias:
                shapes[f"{prefix}.self_attn.{name}.bias"] = (out_dim,)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (hidden, q_out)
        if config.attention_bias:
            shapes[f"{prefix}.self_attn.o_proj.bias"] = (hidden,)
        if not config.is_moe_layer(layer):
            shapes.update(_mlp_shapes(f"{prefix}.mlp", hidden, config.intermediate_size))
            continue
        shapes[f"{prefix}.mlp.gate.weight"] = (config.n_routed_experts, hidden)
        for expert in range(config.n_routed_experts):
            shapes.update(_mlp_shapes(f"{prefix}.mlp.experts.{expert}", hidden, config.moe_intermediate_size))
        if config.n_shared_experts:
            width = config.n_shared_experts * config.moe_intermediate_size
            shapes.update(_mlp_shapes(f"{prefix}.mlp.shared_experts", hidden, width))
    return shapes


def _mlp_shapes(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.gate_proj.weight": (width, hidden),
        f"{prefix}.up_proj.weight": (width, hidden),
        f"{prefix}.down_proj.weight": (hidden, width),
    }


def checkpoint_tensor_files(directory: str | os.PathLike) -> dict[str, str]:
    """Map every tensor name of a checkpoint directory to the file that holds it, from its index or single file."""
    directory = Path(directory)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index_path} is not a valid index file (no 'weight_map'): {err}") from err
            missing_files = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
            if missing_files:
                raise CheckpointError(
                    f"{index_path.name} lists shard(s) missing from {directory}: {', '.join(missing_files)}. "
                    "Download the missing file(s) again."
                )
            return dict(weight_map)
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (directory / single).is_file():
            return {name: single for name in read_tensor_shapes(directory / single)}
    raise CheckpointError(
        f"{directory} holds no weights: expected {SAFE_INDEX}, {BIN_INDEX}, {SAFE_SINGLE} or {BIN_SINGLE}."
    )


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one weight file, without reading the data (safetensors header / memory-mapped .bin)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def validate_checkpoint(directory: str | os.PathLike, config: DeepseekMoEConfig) -> None:
    """Check a checkpoint directory against `config`: every shard present, every released tensor present with the
    shape the config implies, and no extra tensor. Raises `CheckpointError` naming the file, tensor and attribute."""
    directory = Path(directory)
    files = checkpoint_tensor_files(directory)
    expected = released_tensor_shapes(config, with_lm_head="lm_head.weight" in files or not config.tie_word_embeddings)
    actual: dict[str, tuple[int, ...]] = {}
    for file_name in sorted(set(files.values())):
        for name, shape in read_tensor_shapes(directory / file_name).items():
            actual[name] = shape
    listed_not_stored = sorted(name for name, f in files.items() if name not in actual)
    if listed_not_stored:
        raise CheckpointError(
            f"{len(listed_not_stored)} tensor(s) listed in the index are not in their shard, e.g. "
            f"{listed_not_stored[0]} (expected in {files[listed_not_stored[0]]}); the shard is incomplete."
        )
    problems = []
    missing = [name for name in expected if name not in actual]
    if missing:
        problems.append(f"missing tensor(s): {_first(missing)}")
    extra = [name for name in actual if name not in expected and not name.endswith("rotary_emb.inv_freq")]
    if extra:
        problems.append(f"unexpected tensor(s) for this config: {_first(extra)}")
    wrong = [
        f"{name} has shape {list(actual[name])} in {files.get(name, '?')}, config implies {list(shape)}"
        for name, shape in expected.items()
        if name in actual and actual[name] != shape
    ]
    if wrong:
        problems.append(f"shape mismatch: {_first(wrong)}")
    if problems:
        raise CheckpointError(
            f"{directory} does not match its config.json ({_config_summary(config)}): "
            + "; ".join(problems)
            + ". Re-download the checkpoint or fix config.json (n_routed_experts, num_hidden_layers, "
            "first_k_dense_replace, moe_layer_freq, hidden sizes)."
        )


def _first(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _config_summary(config: DeepseekMoEConfig) -> str:
    return (
        f"num_hidden_layers={config.num_hidden_layers}, n_routed_experts={config.n_routed_experts}, "
        f"hidden_size={config.hidden_size}, moe_intermediate_size={config.moe_intermediate_size}"
    )


def _random_tensors(
    config: DeepseekMoEConfig, dtype: torch.dtype, generator: torch.Generator
) -> Iterator[tuple[str, torch.Tensor]]:
    std = config.initializer_range
    for name, shape in released_tensor_shapes(config).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            yield name, torch.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape, dtype=dtype)
        else:
            yield name, (torch.randn(shape, generator=generator) * std).to(dtype)


def write_random_released_checkpoint(
    config: DeepseekMoEConfig,
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 1024**3,
    seed: int = 0,
    weight_format: str = "safetensors",
) -> Path:
    """Write random weights for `config` in the released layout, the way the released repos look: per-expert tensors,
    shards plus an index, and a config.json with `auto_map` to the remote code, `architectures:
    ["DeepseekForCausalLM"]` and `torch_dtype`. Streams shard by shard, so the full 16B config fits in host memory.
    `weight_format` is "safetensors" or "bin" (the older `pytorch_model-*.bin` repos)."""
    if weight_format not in ("safetensors", "bin"):
        raise ValueError(f"weight_format must be 'safetensors' or 'bin', got {weight_format!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    extension = "safetensors" if weight_format == "safetensors" else "bin"
    stem = "model" if weight_format == "safetensors" else "pytorch_model"
    shards: list[dict[str, torch.Tensor]] = [{}]
    temporary_names: list[str] = []
    weight_map: dict[str, int] = {}
    shard_bytes, total_bytes = 0, 0

    def flush(shard: dict[str, torch.Tensor]) -> None:
        temporary = f"{stem}-shard{len(temporary_names):05d}.tmp"
        if weight_format == "safetensors":
            save_file(shard, str(directory / temporary), metadata={"format": "pt"})
        else:
            torch.save(shard, directory / temporary)
        temporary_names.append(temporary)

    for name, tensor in _random_tensors(config, dtype, generator):
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            flush(shards[-1])
            shards[-1] = {}
            shard_bytes = 0
        shards[-1][name] = tensor
        weight_map[name] = len(temporary_names)
        shard_bytes += size
        total_bytes += size
    flush(shards[-1])

    count = len(temporary_names)
    final_names = [f"{stem}-{i + 1:05d}-of-{count:05d}.{extension}" for i in range(count)]
    for temporary, final in zip(temporary_names, final_names):
        os.replace(directory / temporary, directory / final)
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": {name: final_names[i] for name, i in sorted(weight_map.items())},
    }
    (directory / (SAFE_INDEX if weight_format == "safetensors" else BIN_INDEX)).write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(released_config_dict(config, dtype), indent=2))
    return directory


def released_config_dict(config: DeepseekMoEConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A config.json as the released repos ship it (transformers 4.36 era), for `config`."""
    keys = [
        "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "first_k_dense_replace", "hidden_act",
        "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings", "moe_intermediate_size",
        "moe_layer_freq", "n_routed_experts", "n_shared_experts", "norm_topk_prob", "num_attention_heads",
        "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads", "pretraining_tp", "rms_norm_eps",
        "rope_scaling", "rope_theta", "scoring_func", "tie_word_embeddings", "use_cache", "vocab_size",
    ]  # fmt: skip
    released = {key: getattr(config, key) for key in keys}
    released.update(
        architectures=["DeepseekForCausalLM"],
        auto_map=dict(RELEASED_AUTO_MAP),
        model_type="deepseek",
        torch_dtype=str(dtype).removeprefix("torch."),
        transformers_version="4.36.0",
    )
    return dict(sorted(released.items()))
