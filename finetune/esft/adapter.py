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


def _expert_views(model, layer: int, expert: int, width: int) -> dict[str, torch.Tensor]:
    """Views of one expert's three projections under their released names, in a plain fused layer or an
    ESFT-wrapped one (whose trained experts live in their own parameters)."""
    module = model.model.layers[layer].mlp.experts
    if hasattr(module, "expert_weights"):
        gate_up, down = module.expert_weights(expert)
    else:
        gate_up, down = module.gate_up_proj[expert], module.down_proj[expert]
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    return {
        f"{prefix}.gate_proj.weight": gate_up[:width],
        f"{prefix}.up_proj.weight": gate_up[width:],
        f"{prefix}.down_proj.weight": down,
    }


def adapter_tensors(model, expert_config: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors, read from `model`, under their released checkpoint names."""
    config = model.config
    selection = validate_expert_config(expert_config, config)
    width = config.moe_intermediate_size
    tensors: dict[str, torch.Tensor] = {}
    for layer, experts in selection.items():
        for expert in experts:
            tensors.update(_expert_views(model, layer, expert, width))
    state = model.state_dict()
    for name, tensor in state.items():
        shared = ".mlp.shared_experts." in name
        if (shared and expert_config.get("shared_experts")) or (
            expert_config.get("non_expert_modules") and not shared and is_non_expert_parameter(name)
        ):
            tensors[name] = tensor
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}


def save_esft_adapter(
    model, expert_config: dict, adapter_dir: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write the current weights of the experts `expert_config` selects as an ESFT adapter (atomically)."""
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
    """Write an ESFT adapter's weights into `model` (in place) and return it."""
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
    expected = adapter_tensors(model, expert_config)
    if expected.keys() != tensors.keys():
        missing = sorted(expected.keys() - tensors.keys())[:3]
        raise ValueError(f"The ESFT adapter {adapter_dir} lacks tensors its expert config selects, e.g. {missing}.")
    width = model.config.moe_intermediate_size
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"ESFT adapter tensor {name} has shape {list(tensor.shape)}, the model expects "
                    f"{list(expected[name].shape)}."
                )
            parts = name.split(".")
            if ".mlp.experts." in name:
                target = _expert_views(model, int(parts[2]), int(parts[5]), width)[name]
            else:
                target = state[name]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    return model
