"""ESFT adapters: the weights of the experts (and optionally the shared experts / non-expert modules) that an ESFT run
trained, stored apart from the frozen base.

An adapter directory holds
- `expert_config.json`: the selection, in the ESFT repository's format
  `{"experts": {"<layer>": [expert ids]}, "shared_experts": bool, "non_expert_modules": bool}`;
- `adapter_model.safetensors`: the trained tensors under their released checkpoint names
  (`model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`, ...), so they can be read by any tool;
- `esft_adapter.json`: the base model it belongs to and the config values it must match.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modeling_deepseekmoe import DeepseekMoEConfig

from .full_parameters import full_shape, read_full, write_full, write_rows


EXPERT_CONFIG_FILE = "expert_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_METADATA_FILE = "esft_adapter.json"
# Config values an adapter must share with the base it is applied to.
MATCHED_CONFIG_KEYS = (
    "model_type", "hidden_size", "moe_intermediate_size", "intermediate_size", "num_hidden_layers",
    "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq", "vocab_size",
)  # fmt: skip
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def validate_expert_config(expert_config: dict, config: DeepseekMoEConfig) -> dict[int, list[int]]:
    """Check an ESFT expert config against a model config; returns {layer: sorted expert ids}."""
    if not isinstance(expert_config, dict) or "experts" not in expert_config:
        raise ValueError('An ESFT expert config is a dict {"experts": {"<layer>": [ids]}, "shared_experts": bool, '
                         '"non_expert_modules": bool}; "experts" is missing.')
    selection: dict[int, list[int]] = {}
    moe_layers = set(config.moe_layer_indices)
    for layer_key, experts in expert_config["experts"].items():
        layer = int(layer_key)
        if not 0 <= layer < config.num_hidden_layers:
            raise ValueError(
                f"Expert config names layer {layer}, but the model has layers 0..{config.num_hidden_layers - 1}."
            )
        if experts and layer not in moe_layers:
            raise ValueError(
                f"Expert config selects experts in layer {layer}, which is a dense layer (MoE layers: "
                f"{sorted(moe_layers)}); remove it from the selection."
            )
        bad = [e for e in experts if not 0 <= int(e) < config.n_routed_experts]
        if bad:
            raise ValueError(
                f"Expert config selects expert(s) {bad} in layer {layer}, but layers have experts "
                f"0..{config.n_routed_experts - 1}."
            )
        if experts:
            selection[layer] = sorted({int(e) for e in experts})
    if not selection and not expert_config.get("shared_experts") and not expert_config.get("non_expert_modules"):
        raise ValueError("The expert config selects nothing to train (no experts, no shared experts, no non-expert "
                         "modules); lower the selection threshold or choose experts.")
    return selection


def is_non_expert_parameter(name: str) -> bool:
    """Attention, norms, dense-layer MLPs, embeddings and LM head: everything but experts and routers."""
    return ".mlp.experts." not in name and ".mlp.shared_experts." not in name and not name.endswith(".mlp.gate.weight")


def _layer_expert_weights(module, experts: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(gate_up [2I, H], down [H, I]) of each of `experts` in a layer's routed experts, plain fused or ESFT-wrapped
    (whose trained experts live in their own `[S, ...]` parameters), read whole under any engine."""
    slots = getattr(module, "slots", {})
    weights = {}
    if any(expert in slots for expert in experts):
        gate_up, down = read_full(module.gate_up_proj), read_full(module.down_proj)
        weights.update({e: (gate_up[slots[e]], down[slots[e]]) for e in experts if e in slots})
    others = [expert for expert in experts if expert not in slots]
    if others:
        fused = module.frozen if hasattr(module, "frozen") else module
        gate_up, down = read_full(fused.gate_up_proj), read_full(fused.down_proj)
        weights.update({e: (gate_up[e], down[e]) for e in others})
    return weights


def _released_expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    return tuple(f"{prefix}.{projection}.weight" for projection in PROJECTIONS)


def _selected_parameters(model, expert_config: dict):
    """(name, parameter) of the shared experts / non-expert modules that `expert_config` trains."""
    for name, parameter in model.named_parameters(remove_duplicate=False):
        shared = ".mlp.shared_experts." in name
        if (shared and expert_config.get("shared_experts")) or (
            expert_config.get("non_expert_modules") and not shared and is_non_expert_parameter(name)
        ):
            yield name, parameter


def adapter_tensors(model, expert_config: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors, read from `model`, under their released checkpoint names, on the CPU. Under ZeRO-3 and
    FSDP2 this gathers the selected tensors (only those): call it on every rank."""
    config = model.config
    selection = validate_expert_config(expert_config, config)
    width = config.moe_intermediate_size
    tensors: dict[str, torch.Tensor] = {}
    for layer, experts in selection.items():
        weights = _layer_expert_weights(model.model.layers[layer].mlp.experts, experts)
        for expert in experts:
            gate_up, down = weights[expert]
            gate, up, down_name = _released_expert_names(layer, expert)
            tensors.update({gate: gate_up[:width], up: gate_up[width:], down_name: down})
    for name, parameter in _selected_parameters(model, expert_config):
        tensors[name] = read_full(parameter)
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}


def adapter_tensor_shapes(model, expert_config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an adapter for `expert_config` holds (reads no weight)."""
    config = model.config
    width, hidden = config.moe_intermediate_size, config.hidden_size
    shapes = {}
    for layer, experts in validate_expert_config(expert_config, config).items():
        for expert in experts:
            gate, up, down = _released_expert_names(layer, expert)
            shapes.update({gate: (width, hidden), up: (width, hidden), down: (hidden, width)})
    for name, parameter in _selected_parameters(model, expert_config):
        shapes[name] = tuple(full_shape(parameter))
    return shapes


def save_esft_adapter(
    model,
    expert_config: dict,
    adapter_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the current weights of the experts `expert_config` selects as an ESFT adapter (atomically). `tensors`:
    the adapter's tensors if already read (`adapter_tensors`, e.g. gathered on every rank, written by one)."""
    if tensors is None:
        tensors = adapter_tensors(model, expert_config)
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    metadata = {
        "base_model_name_or_path": base_model_name_or_path or model.config.name_or_path or None,
        "config": {key: getattr(model.config, key) for key in MATCHED_CONFIG_KEYS},
        "num_parameters": sum(t.numel() for t in tensors.values()),
    }
    # Each file is written whole (temporary name, then rename); the metadata file, last, marks a complete adapter.
    (adapter_dir / ADAPTER_METADATA_FILE).unlink(missing_ok=True)
    _write_atomically(adapter_dir / ADAPTER_WEIGHTS_FILE, lambda path: save_file(tensors, str(path), {"format": "pt"}))
    _write_atomically(adapter_dir / EXPERT_CONFIG_FILE,
                      lambda path: path.write_text(json.dumps(_normalised(expert_config), indent=2) + "\n"))
    _write_atomically(adapter_dir / ADAPTER_METADATA_FILE,
                      lambda path: path.write_text(json.dumps(metadata, indent=2) + "\n"))
    return adapter_dir


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def _normalised(expert_config: dict) -> dict:
    return {
        "experts": {str(layer): sorted(int(e) for e in ids) for layer, ids in expert_config["experts"].items()},
        "shared_experts": bool(expert_config.get("shared_experts", False)),
        "non_expert_modules": bool(expert_config.get("non_expert_modules", False)),
    }


def load_esft_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(expert_config, tensors, metadata) of an adapter directory."""
    adapter_dir = Path(adapter_dir)
    for file_name in (EXPERT_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_METADATA_FILE):
        if not (adapter_dir / file_name).is_file():
            raise FileNotFoundError(f"{adapter_dir} is not an ESFT adapter: {file_name} is missing.")
    expert_config = json.loads((adapter_dir / EXPERT_CONFIG_FILE).read_text())
    metadata = json.loads((adapter_dir / ADAPTER_METADATA_FILE).read_text())
    return expert_config, load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE)), metadata


def apply_esft_adapter(model, adapter_dir: str | os.PathLike):
    """Write an ESFT adapter's weights into `model` (in place) and return it. Works on a ZeRO-3 or FSDP2 sharded
    model too (then every rank calls it)."""
    expert_config, tensors, metadata = load_esft_adapter(adapter_dir)
    mismatched = {
        key: (value, getattr(model.config, key, None))
        for key, value in metadata["config"].items()
        if getattr(model.config, key, None) != value
    }
    if mismatched:
        details = ", ".join(f"{key}: adapter {a!r} vs model {m!r}" for key, (a, m) in mismatched.items())
        raise ValueError(
            f"The ESFT adapter {adapter_dir} does not match this base model ({details}); it was trained on "
            f"{metadata.get('base_model_name_or_path')!r}."
        )
    expected = adapter_tensor_shapes(model, expert_config)
    if expected.keys() != tensors.keys():
        missing = sorted(expected.keys() - tensors.keys())[:3]
        raise ValueError(f"The ESFT adapter {adapter_dir} lacks tensors its expert config selects, e.g. {missing}.")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"ESFT adapter tensor {name} has shape {list(tensor.shape)}, the model expects {list(expected[name])}."
            )
    for layer, experts in validate_expert_config(expert_config, model.config).items():
        module = model.model.layers[layer].mlp.experts
        slots = getattr(module, "slots", {})
        fused = module.frozen if hasattr(module, "frozen") else module
        # Trained experts go to their row of the ESFT parameters, any other to its row of the fused tensors.
        rows = {id(module): ({}, {}), id(fused): ({}, {})}
        for expert in experts:
            gate, up, down = (tensors[name] for name in _released_expert_names(layer, expert))
            gate_up_rows, down_rows = rows[id(module) if expert in slots else id(fused)]
            row = slots.get(expert, expert)
            gate_up_rows[row], down_rows[row] = torch.cat([gate, up]), down
        for target in dict.fromkeys((module, fused)):
            gate_up_rows, down_rows = rows[id(target)]
            write_rows(target.gate_up_proj, gate_up_rows)
            write_rows(target.down_proj, down_rows)
    for name, parameter in _selected_parameters(model, expert_config):
        write_full(parameter, tensors[name])
    return model
