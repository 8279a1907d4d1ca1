"""The checkpoint layouts: which tensors a DeepSeekMoE checkpoint holds, checking a directory against it, and
writing random weights in the released layout (for tests and for full-size benchmarks without a download).

Released layout: `config.json` (`model_type: "deepseek"`), sharded `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json` (older repos: `pytorch_model-*.bin` + `pytorch_model.bin.index.json`), one tensor per
expert projection: `model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`. The other layouts a checkpoint of
the family can have: the base model's (no `model.` prefix, no head), the classifier's (`score.weight` instead of
`lm_head.weight`), and transformers' native fused experts (`mlp.experts.gate_up_proj` / `down_proj`).
"""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

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


class CheckpointShapeError(CheckpointError, RuntimeError):
    """A tensor's shape differs from the one the config implies; a RuntimeError too, as transformers' own error for
    a size mismatch is."""


# What a checkpoint is, by the class that saved it: the base model (tensor names without the `model.` prefix), or a
# model with a task head (prefixed backbone plus the head's tensor). Any class of the family loads any of them.
BASE_MODEL, CAUSAL_LM, SEQUENCE_CLASSIFIER = "base model", "causal LM", "sequence classifier"
HEAD_TENSORS = {CAUSAL_LM: "lm_head.weight", SEQUENCE_CLASSIFIER: "score.weight"}
BACKBONE_PREFIX = "model."
# Buffers the reference code stored in old checkpoints; recomputed, never loaded.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def released_tensor_shapes(config: DeepseekMoEConfig, with_lm_head: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a released-layout checkpoint for `config`, with its shape ([out, in] for projections)."""
    shapes = backbone_tensor_shapes(config)
    if with_lm_head and not config.tie_word_embeddings:
        shapes[HEAD_TENSORS[CAUSAL_LM]] = (config.vocab_size, config.hidden_size)
    return shapes


def backbone_tensor_shapes(
    config: DeepseekMoEConfig, prefix: str = BACKBONE_PREFIX, fused_layers: frozenset[int] = frozenset()
) -> dict[str, tuple[int, ...]]:
    """The backbone's tensors (`DeepseekMoEModel`'s, under `prefix`): released per-expert tensors for the MoE layers,
    except those in `fused_layers`, stored the way transformers' native save writes them (`mlp.experts.gate_up_proj
    [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`, from `save_pretrained(save_original_format=False)`)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    shapes = {f"{prefix}embed_tokens.weight": (config.vocab_size, hidden), f"{prefix}norm.weight": (hidden,)}
    for layer in range(config.num_hidden_layers):
        layer_prefix = f"{prefix}layers.{layer}"
        shapes[f"{layer_prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer_prefix}.post_attention_layernorm.weight"] = (hidden,)
        q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        for name, out_dim in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[f"{layer_prefix}.self_attn.{name}.weight"] = (out_dim, hidden)
            if config.attention_bias:
                shapes[f"{layer_prefix}.self_attn.{name}.bias"] = (out_dim,)
        shapes[f"{layer_prefix}.self_attn.o_proj.weight"] = (hidden, q_out)
        if config.attention_bias:
            shapes[f"{layer_prefix}.self_attn.o_proj.bias"] = (hidden,)
        if not config.is_moe_layer(layer):
            shapes.update(_mlp_shapes(f"{layer_prefix}.mlp", hidden, config.intermediate_size))
            continue
        experts, width = config.n_routed_experts, config.moe_intermediate_size
        shapes[f"{layer_prefix}.mlp.gate.weight"] = (experts, hidden)
        if layer in fused_layers:
            shapes[f"{layer_prefix}.mlp.experts.gate_up_proj"] = (experts, 2 * width, hidden)
            shapes[f"{layer_prefix}.mlp.experts.down_proj"] = (experts, hidden, width)
        else:
            for expert in range(experts):
                shapes.update(_mlp_shapes(f"{layer_prefix}.mlp.experts.{expert}", hidden, width))
        if config.n_shared_experts:
            shapes.update(_mlp_shapes(f"{layer_prefix}.mlp.shared_experts", hidden, config.n_shared_experts * width))
    return shapes


def _mlp_shapes(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.gate_proj.weight": (width, hidden),
        f"{prefix}.up_proj.weight": (width, hidden),
        f"{prefix}.down_proj.weight": (hidden, width),
    }


def checkpoint_kind(tensor_names, config: DeepseekMoEConfig) -> str:
    """Which class saved a checkpoint: from its tensor names (no `model.` prefix: the base model), and, for a prefixed
    checkpoint holding no head (lost, or tied), from `config.architectures`; one that says nothing is the released
    causal LM."""
    names = set(tensor_names)
    if not any(name.startswith(BACKBONE_PREFIX) for name in names):
        return BASE_MODEL
    for kind, head in HEAD_TENSORS.items():
        if head in names:
            return kind
    return SEQUENCE_CLASSIFIER if kind_of_architectures(config) == SEQUENCE_CLASSIFIER else CAUSAL_LM


def kind_of_architectures(config: DeepseekMoEConfig) -> str:
    """The kind of checkpoint `config.architectures` (as a save wrote it) names; the released causal LM if none."""
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if architecture.endswith("ForSequenceClassification"):
        return SEQUENCE_CLASSIFIER
    if architecture.endswith("Model"):
        return BASE_MODEL
    return CAUSAL_LM


def expected_tensor_shapes(tensor_names, config: DeepseekMoEConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of `kind` for `config` holds, in the expert layout (per layer) its names show."""
    names = set(tensor_names)
    prefix = "" if kind == BASE_MODEL else BACKBONE_PREFIX
    fused = frozenset(
        layer for layer in config.moe_layer_indices
        if {f"{prefix}layers.{layer}.mlp.experts.gate_up_proj", f"{prefix}layers.{layer}.mlp.experts.down_proj"} & names
    )  # fmt: skip
    shapes = backbone_tensor_shapes(config, prefix, fused)
    if kind == CAUSAL_LM and (HEAD_TENSORS[CAUSAL_LM] in names or not config.tie_word_embeddings):
        shapes[HEAD_TENSORS[CAUSAL_LM]] = (config.vocab_size, config.hidden_size)
    elif kind == SEQUENCE_CLASSIFIER:
        shapes[HEAD_TENSORS[SEQUENCE_CLASSIFIER]] = (config.num_labels, config.hidden_size)
    return shapes


def _with_variant(file_name: str, variant: str | None) -> str:
    if not variant:
        return file_name
    stem, extension = file_name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def checkpoint_tensor_files(
    directory: str | os.PathLike, use_safetensors: bool | None = None, variant: str | None = None
) -> dict[str, str]:
    """Map every tensor name of a checkpoint directory to the file that holds it, reading the weights transformers'
    `from_pretrained` reads (same order: model.safetensors, its index, pytorch_model.bin, its index)."""
    directory = Path(directory)
    candidates = [(SAFE_SINGLE, False), (SAFE_INDEX, True), (BIN_SINGLE, False), (BIN_INDEX, True)]
    if use_safetensors is not None:
        candidates = [c for c in candidates if c[0].startswith("model.") == use_safetensors]
    for name, is_index in candidates:
        path = directory / _with_variant(name, variant)
        if not path.is_file():
            continue
        if not is_index:
            return {tensor: path.name for tensor in read_tensor_info(path)}
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path} is not a valid index file (no 'weight_map'): {err}") from err
        missing_files = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing_files:
            raise CheckpointError(
                f"{path.name} lists shard(s) missing from {directory}: {', '.join(missing_files)}. "
                "Download the missing file(s) again."
            )
        return dict(weight_map)
    names = ", ".join(_with_variant(name, variant) for name, _ in candidates)
    raise CheckpointError(f"{directory} holds no weights: expected one of {names}.")


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: str  # as the file names it: "BF16", "I8" (safetensors), "bfloat16", "int8" (.bin)
    is_floating_point: bool


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one weight file, without reading the data (safetensors header / memory-mapped .bin)."""
    return {name: info.shape for name, info in read_tensor_info(path).items()}


def read_tensor_info(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Shape and dtype of every tensor of one weight file, without reading the data."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                info = {}
                for name in handle.keys():
                    tensor_slice = handle.get_slice(name)
                    dtype = tensor_slice.get_dtype()
                    info[name] = TensorInfo(tuple(tensor_slice.get_shape()), dtype, dtype.startswith(("F", "BF")))
                return info
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:  # truncated or corrupt
        raise CheckpointError(f"{path} cannot be read ({str(err).splitlines()[0]}); download it again.") from err
    return {
        name: TensorInfo(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), tensor.is_floating_point())
        for name, tensor in state.items()
    }


def validate_checkpoint(
    directory: str | os.PathLike,
    config: DeepseekMoEConfig,
    ignore_mismatched_sizes: bool = False,
    use_safetensors: bool | None = None,
    variant: str | None = None,
) -> str:
    """Check a checkpoint directory against `config`: a `model_type: "deepseek"` config.json, every shard present,
    every tensor of the class that saved it (base model, causal LM or classifier; released per-expert or fused
    experts) present with the shape the config implies (unless `ignore_mismatched_sizes`) and a floating-point dtype,
    and no other tensor. Returns that kind; raises `CheckpointError` naming the file, tensor and fix."""
    directory = Path(directory)
    check_model_type(directory)
    files = checkpoint_tensor_files(directory, use_safetensors, variant)
    actual: dict[str, TensorInfo] = {}
    for file_name in sorted(set(files.values())):
        actual.update(read_tensor_info(directory / file_name))
    listed_not_stored = sorted(name for name in files if name not in actual)
    if listed_not_stored:
        raise CheckpointError(
            f"{len(listed_not_stored)} tensor(s) listed in the index are not in their shard, e.g. "
            f"{listed_not_stored[0]} (expected in {files[listed_not_stored[0]]}); the shard is incomplete."
        )
    actual = {name: info for name, info in actual.items() if not name.endswith(IGNORED_TENSOR_SUFFIXES)}
    kind = checkpoint_kind(actual, config)
    expected = expected_tensor_shapes(actual, config, kind)
    problems, fixes = [], []
    missing = [name for name in expected if name not in actual]
    lost_head = [name for name in missing if name in HEAD_TENSORS.values()]
    if lost_head:
        problems.append(f"the {kind} head {lost_head[0]} is missing")
        fixes.append(f"re-download the checkpoint (config.json says it is a {kind}: {config.architectures})")
    missing = [name for name in missing if name not in lost_head]
    if missing:
        problems.append(f"missing tensor(s): {_first(missing)}")
    extra = [name for name in actual if name not in expected]
    if extra:
        problems.append(f"unexpected tensor(s) for this config: {_first(extra)}")
    if missing or extra:
        fixes.append(
            "re-download the checkpoint or fix config.json (n_routed_experts, num_hidden_layers, "
            "first_k_dense_replace, moe_layer_freq, hidden sizes)"
        )
    wrong = [
        f"{name} has shape {list(actual[name].shape)} in {files.get(name, '?')}, config implies {list(shape)}"
        for name, shape in expected.items()
        if name in actual and actual[name].shape != shape
    ]
    if wrong and not ignore_mismatched_sizes:
        problems.append(f"shape mismatch: {_first(wrong)}")
        fixes.append(
            "fix config.json to the checkpoint's sizes, or pass ignore_mismatched_sizes=True to re-initialise "
            "the mismatched tensors"
        )
    if not is_prequantized_config(config):
        not_float = [
            f"{name} is {actual[name].dtype} in {files.get(name, '?')}"
            for name in expected if name in actual and not actual[name].is_floating_point
        ]  # fmt: skip
        if not_float:
            problems.append(f"non-floating-point tensor(s): {_first(not_float)}")
            fixes.append(
                "a model's weights are floating point: re-download or re-convert the checkpoint (a quantized "
                "checkpoint states its quantization_config in config.json)"
            )
    if problems:
        error = CheckpointShapeError if wrong and not ignore_mismatched_sizes else CheckpointError
        raise error(
            f"{directory} does not match the config it is loaded with ({_config_summary(config)}): "
            + f"{'; '.join(problems)}. To fix: {'; '.join(fixes)}."
        )
    return kind


def is_prequantized_config(config: DeepseekMoEConfig) -> bool:
    return getattr(config, "quantization_config", None) is not None


def check_model_type(directory: str | Path) -> None:
    """Refuse a directory whose config.json is not a DeepSeekMoE one (before anything would run its code)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        return
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err}); download it again.") from err
    if model_type != DeepseekMoEConfig.model_type:
        raise CheckpointError(
            f"{config_path} has model_type {model_type!r}, not {DeepseekMoEConfig.model_type!r}: it is not a "
            "DeepSeekMoE checkpoint; load it with the class for its type (or, for a DeepSeekMoE checkpoint, set "
            '"model_type": "deepseek").'
        )


def _first(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _config_summary(config: DeepseekMoEConfig) -> str:
    return (
        f"num_hidden_layers={config.num_hidden_layers}, n_routed_experts={config.n_routed_experts}, "
        f"hidden_size={config.hidden_size}, moe_intermediate_size={config.moe_intermediate_size}"
    )


def _random_tensor(name: str, shape: tuple[int, ...], config: DeepseekMoEConfig, dtype, generator) -> torch.Tensor:
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * config.initializer_range).to(dtype)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> bytes:
    """The header of a safetensors file holding `entries` (name, shape) of `dtype`, data in that order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, shape in entries:
        size = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded


def write_random_released_checkpoint(
    config: DeepseekMoEConfig,
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 1024**3,
    seed: int = 0,
    weight_format: str = "safetensors",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write random weights for `config` in the released layout, the way the released repos look: per-expert tensors,
    shards plus an index, and a config.json with `auto_map` to the remote code, `architectures:
    ["DeepseekForCausalLM"]` and `torch_dtype`. Safetensors shards are written tensor by tensor (memory holds one
    tensor, so the full 16B is written on any machine); `progress(bytes)` is called after each tensor.
    `weight_format` is "safetensors" or "bin" (the older `pytorch_model-*.bin` repos, written shard by shard)."""
    if weight_format not in ("safetensors", "bin"):
        raise ValueError(f"weight_format must be 'safetensors' or 'bin', got {weight_format!r}")
    if weight_format == "safetensors" and dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(map(str, _SAFETENSORS_DTYPES))}, got {dtype}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    extension = "safetensors" if weight_format == "safetensors" else "bin"
    stem = "model" if weight_format == "safetensors" else "pytorch_model"
    itemsize = torch.empty((), dtype=dtype).element_size()

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes, total_bytes = 0, 0
    for name, shape in released_tensor_shapes(config).items():
        size = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, shape))
        shard_bytes += size
        total_bytes += size

    count = len(shards)
    final_names = [f"{stem}-{i + 1:05d}-of-{count:05d}.{extension}" for i in range(count)]
    for number, entries in enumerate(shards):
        temporary = directory / f"{stem}-shard{number:05d}.tmp"
        if weight_format == "safetensors":
            with open(temporary, "wb") as handle:
                handle.write(_safetensors_header(entries, dtype))
                for name, shape in entries:
                    tensor = _random_tensor(name, shape, config, dtype, generator)
                    handle.write(tensor.contiguous().view(torch.uint8).numpy().data)
                    if progress is not None:
                        progress(tensor.numel() * itemsize)
        else:
            shard = {name: _random_tensor(name, shape, config, dtype, generator) for name, shape in entries}
            torch.save(shard, temporary)
            if progress is not None:
                progress(sum(t.numel() * itemsize for t in shard.values()))
    for number, final in enumerate(final_names):
        os.replace(directory / f"{stem}-shard{number:05d}.tmp", directory / final)
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": dict(sorted((name, final_names[i]) for i, entries in enumerate(shards) for name, _ in entries)),
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
