"""LoRA for DeepSeekMoE with PEFT: choose attention, routed experts, shared experts and dense MLPs by name and by
layer, load adapters back (re-registering the expert layer) and merge into a plain model.

    config = build_lora_config(["attention", "experts"], layers=[1, 2], r=8, lora_alpha=16, lora_dropout=0.1)
    model = peft.get_peft_model(model, config)
"""

import dataclasses
import functools
import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftModel
from safetensors import safe_open

from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoEExperts
from modeling_deepseekmoe.routing import decoder_layer_index
from modeling_deepseekmoe.quantization import DeepseekMoEQuantizedExperts

from .expert_lora import ExpertsLoraLayer


# Module-name patterns (after "layers.<i>.") of each target group.
TARGET_GROUPS = {
    "attention": r"self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "experts": r"mlp\.experts",
    "shared_experts": r"mlp\.shared_experts\.(gate_proj|up_proj|down_proj)",
    "dense_mlp": r"mlp\.(gate_proj|up_proj|down_proj)",
}
TARGET_ALIASES = {"all": list(TARGET_GROUPS), "all-linear": ["attention", "shared_experts", "dense_mlp"]}


@dataclass
class DeepseekMoELoraConfig(LoraConfig):
    """PEFT's `LoraConfig` plus the routed experts that carry LoRA (`expert_ids`, {layer: [expert ids]}; None for
    every expert of every targeted layer), saved in the adapter's `adapter_config.json` when there is a selection:
    without one the file is a plain `LoraConfig`, which PEFT's own readers take without an "Unexpected keyword
    arguments" warning."""

    expert_ids: dict[int, list[int]] | None = field(
        default=None, metadata={"help": "Routed experts that get LoRA, per layer (None: all of them)."}
    )

    def to_dict(self) -> dict:
        values = super().to_dict()
        if values.get("expert_ids") is None:
            values.pop("expert_ids", None)
        return values


def target_modules_pattern(targets: str | Iterable[str], layers: Iterable[int] | None = None) -> str:
    """A regex for PEFT's `target_modules` that matches the chosen groups (or raw patterns) in the chosen layers."""
    names = [targets] if isinstance(targets, str) else list(targets)
    groups: list[str] = []
    for name in names:
        for group in TARGET_ALIASES.get(name, [name]):
            if group in TARGET_GROUPS:
                groups.append(TARGET_GROUPS[group])
            elif group.replace("_", "").isalnum():
                raise ValueError(
                    f"Unknown LoRA target {group!r}: use {sorted(TARGET_GROUPS) + sorted(TARGET_ALIASES)} or a "
                    "module-name regex such as 'self_attn\\.q_proj'."
                )
            else:
                groups.append(group)
    if not groups:
        raise ValueError("No LoRA targets given.")
    layer_pattern = r"\d+" if layers is None else "|".join(str(int(layer)) for layer in layers)
    return rf"(.*\.)?layers\.({layer_pattern})\.({'|'.join(groups)})"


def build_lora_config(
    target: str | Iterable[str] = "attention",
    layers: Iterable[int] | None = None,
    expert_ids: dict[int, list[int]] | None = None,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    **lora_kwargs,
) -> LoraConfig:
    """A `LoraConfig` for DeepSeekMoE. `target`: groups among "attention", "experts" (routed experts),
    "shared_experts", "dense_mlp", or "all" / "all-linear", or module-name regexes; `layers`: layer indices (all by
    default); `expert_ids`: {layer: [expert ids]} to put LoRA on chosen routed experts only. The router is never a
    target."""
    config = DeepseekMoELoraConfig(
        target_modules=target_modules_pattern(target, layers),
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    register_expert_lora(config, expert_ids)
    return config


def register_expert_lora(config: LoraConfig, expert_ids: dict[int, list[int]] | None = None) -> LoraConfig:
    layer_class = ExpertsLoraLayer
    if expert_ids is not None:
        selection = {int(layer): sorted(int(e) for e in ids) for layer, ids in expert_ids.items()}
        if not isinstance(config, DeepseekMoELoraConfig):
            raise ValueError("LoRA on chosen experts needs a DeepseekMoELoraConfig (build_lora_config makes one), so "
                             "that the selection is saved with the adapter.")
        config.expert_ids = selection
        layer_class = functools.partial(ExpertsLoraLayer, expert_ids=selection)
    config._register_custom_module({DeepseekMoEExperts: layer_class, DeepseekMoEQuantizedExperts: layer_class})
    return config


def saved_expert_selection(adapter_dir: str | os.PathLike) -> dict[int, list[int]] | None:
    """The expert selection of a saved adapter (its `adapter_config.json`; adapters written before it was kept
    there carry it as `lora_expert_ids` tensors in their weights), or None when every expert carries LoRA."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter: adapter_model.safetensors is missing.")
    saved = json.loads((adapter_dir / "adapter_config.json").read_text()).get("expert_ids")
    if saved is not None:
        return {int(layer): [int(e) for e in ids] for layer, ids in saved.items()}
    selection: dict[int, list[int]] = {}
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith("mlp.experts.lora_expert_ids"):
                selection[decoder_layer_index(key)] = handle.get_tensor(key).tolist()
    return selection or None


def load_lora_config(adapter_dir: str | os.PathLike) -> DeepseekMoELoraConfig:
    """An adapter's LoRA config, with the expert LoRA layer registered (PEFT's own loader would drop `expert_ids`)."""
    saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    names = {f.name for f in dataclasses.fields(DeepseekMoELoraConfig) if f.init}
    values = {key: value for key, value in saved.items() if key in names and key != "expert_ids"}
    config = DeepseekMoELoraConfig(**values)
    return register_expert_lora(config, saved_expert_selection(adapter_dir))


def load_lora_adapter(model, adapter_dir: str | os.PathLike, is_trainable: bool = False, **kwargs) -> PeftModel:
    """`PeftModel.from_pretrained` for DeepSeekMoE adapters, with the expert LoRA layer registered again (the config,
    `expert_ids` included, read by `load_lora_config`, not by PEFT's reader, which would warn about it and drop it)."""
    config = load_lora_config(adapter_dir)
    with warnings.catch_warnings():
        # PEFT probes the base with transformers' deprecated `is_gradient_checkpointing`: nothing a user can act on.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable, **kwargs)


def merge_lora(peft_model: PeftModel):
    """Merge every LoRA layer (routed experts included) into the base weights and return the plain model."""
    return peft_model.merge_and_unload()
