"""A PEFT LoRA layer for DeepSeekMoE's fused routed experts.

PEFT's own `target_parameters` wrapper handles only a plain 3D parameter and refuses `lora_dropout != 0`; this layer
wraps the whole experts module instead, so it
- puts LoRA on every expert of a layer or on chosen experts only (`expert_ids`), for the gate/up and the down
  projection (`gate_up_proj` gets one LoRA pair of output width 2I, as the fused weight has);
- supports `lora_dropout`, `use_rslora`, `lora_alpha`/`r` patterns and the usual merge / unmerge / disable;
- works on a frozen base whose experts are plain fused tensors or a quantized form exposing
  `dequantize_expert(expert) -> (gate_up [2I, H], down [H, I])`.

Per expert e: gate_up(x) = W_gu[e] x + s B_gu[e] A_gu[e] dropout(x), down(h) = W_d[e] h + s B_d[e] A_d[e] dropout(h),
s = lora_alpha / r (or / sqrt(r) with rslora). DoRA and LoRA biases are not supported (they raise).
"""

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from modeling_deepseekmoe.routing import decoder_layer_index

from .expert_compute import grouped_projection, linear, looped_projection, sorted_experts_forward


class ExpertLoraPair(nn.Module):
    """One LoRA factor for the selected experts: `gate_up [S, a, b]` and `down [S, c, d]`."""

    def __init__(self, gate_up_shape: tuple[int, int, int], down_shape: tuple[int, int, int]):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(gate_up_shape))
        self.down = nn.Parameter(torch.empty(down_shape))


class ExpertsLoraLayer(nn.Module, LoraLayer):
    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "lora_expert_ids")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config,
        r: int = 0,
        lora_alpha: int = 1,
        expert_ids: dict[int, list[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        self.num_experts, self.hidden_dim, self.intermediate_dim = (
            base.num_experts,
            base.hidden_dim,
            base.intermediate_dim,
        )
        # Which experts carry LoRA. Not in the state dict (a persistent non-parameter tensor breaks FSDP2's
        # rank-0 loading): the selection is saved in the adapter config (`finetune.lora.DeepseekMoELoraConfig`).
        self.lora_expert_ids = BufferDict(persistent=False)
        self._expert_slots: dict[str, dict[int, int]] = {}
        self._expert_selection = expert_ids
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.hidden_dim, module.hidden_dim

    def _selected_experts(self, target_name: str) -> list[int]:
        if self._expert_selection is None:
            return list(range(self.num_experts))
        layer = decoder_layer_index(target_name)
        return sorted(self._expert_selection.get(layer, []))

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}.")
        if config.use_dora:
            raise ValueError("DoRA is not supported on the fused routed experts; target them with plain LoRA.")
        if config.lora_bias:
            raise ValueError("lora_bias is not supported on the fused routed experts (they have no bias).")
        experts = self._selected_experts(kwargs.get("target_name", ""))
        if not experts:
            raise ValueError(f"No experts selected for LoRA in {kwargs.get('target_name')}; drop the layer from "
                             "the targets or select experts in it.")
        count, hidden, width = len(experts), self.hidden_dim, self.intermediate_dim
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_dropout[adapter_name] = dropout
        self.lora_A[adapter_name] = ExpertLoraPair((count, r, hidden), (count, r, width))
        self.lora_B[adapter_name] = ExpertLoraPair((count, 2 * width, r), (count, hidden, r))
        self.lora_expert_ids[adapter_name] = torch.tensor(experts, dtype=torch.long)
        self._expert_slots[adapter_name] = {expert: slot for slot, expert in enumerate(experts)}
        self._init_lora(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name, device=self._base_device())
        if self.lora_expert_ids[adapter_name].is_meta:  # a base loaded on the meta device (FSDP2, ranks > 0)
            self.lora_expert_ids[adapter_name] = torch.tensor(experts, dtype=torch.long)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _base_device(self) -> torch.device:
        base = self.get_base_layer()
        tensor = next(iter(base.parameters()), None)
        if tensor is None:
            tensor = next(iter(base.buffers()))
        return tensor.device

    def _init_lora(self, adapter_name: str, init_lora_weights) -> None:
        lora_a, lora_b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        with torch.no_grad():
            for weight in (lora_a.gate_up, lora_a.down):
                if init_lora_weights == "gaussian":
                    nn.init.normal_(weight, std=1 / self.r[adapter_name])
                else:  # nn.Linear's default, per expert
                    bound = 1 / math.sqrt(weight.shape[-1])
                    nn.init.uniform_(weight, -bound, bound)
            for weight in (lora_b.gate_up, lora_b.down):
                if init_lora_weights is False:
                    nn.init.normal_(weight, std=0.02)
                else:
                    nn.init.zeros_(weight)

    def _expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.get_base_layer()
        if hasattr(base, "dequantize_expert"):
            return base.dequantize_expert(expert)
        return base.gate_up_proj[expert], base.down_proj[expert]

    def get_delta_weight(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta gate_up [S, 2I, H], delta down [S, H, I]) for the adapter's selected experts."""
        lora_a, lora_b, scale = self.lora_A[adapter_name], self.lora_B[adapter_name], self.scaling[adapter_name]
        return (
            torch.bmm(lora_b.gate_up, lora_a.gate_up) * scale,
            torch.bmm(lora_b.down, lora_a.down) * scale,
        )

    def _apply_delta(self, adapter_name: str, sign: int) -> None:
        base = self.get_base_layer()
        if hasattr(base, "dequantize_expert"):
            raise ValueError(
                "Cannot merge LoRA into quantized experts: dequantize the base first "
                "(modeling_deepseekmoe.quantization), then merge."
            )
        ids = self.lora_expert_ids[adapter_name].to(base.gate_up_proj.device)
        delta_gate_up, delta_down = self.get_delta_weight(adapter_name)
        with torch.no_grad():
            base.gate_up_proj.index_add_(0, ids, sign * delta_gate_up.to(base.gate_up_proj.dtype))
            base.down_proj.index_add_(0, ids, sign * delta_down.to(base.down_proj.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter_name in adapter_names or self.active_adapters:
            if adapter_name in self.lora_A and adapter_name not in self.merged_adapters:
                self._apply_delta(adapter_name, +1)
                self.merged_adapters.append(adapter_name)
        if safe_merge:
            base = self.get_base_layer()
            if not (torch.isfinite(base.gate_up_proj).all() and torch.isfinite(base.down_proj).all()):
                raise ValueError("NaNs or infs appeared in the experts after merging the LoRA adapter.")

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._apply_delta(self.merged_adapters.pop(), -1)

    def _full_factor(self, adapter_name: str, factor: str, which: str) -> torch.Tensor:
        """A LoRA factor scattered to all E experts (zeros for the unselected), for the grouped GPU path."""
        weight = getattr(getattr(self, factor)[adapter_name], which)
        ids = self.lora_expert_ids[adapter_name].to(weight.device)
        return weight.new_zeros(self.num_experts, *weight.shape[1:]).index_copy(0, ids, weight)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        base = self.get_base_layer()
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not adapters:
            if self.merged and self.disable_adapters:
                self.unmerge()
            return base(hidden_states, top_k_index, top_k_weights)
        project = functools.partial(self._project, adapters)
        return sorted_experts_forward(hidden_states, top_k_index, top_k_weights, self.num_experts, base.act_fn, project)

    def _lora_delta(self, adapter: str, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.lora_dropout[adapter](rows.to(a.dtype)), a), b) * self.scaling[adapter]

    def _project(self, adapters: list[str], which: str, rows: torch.Tensor, counts: torch.Tensor, grouped=None):
        index = 0 if which == "gate_up" else 1
        if grouped if grouped is not None else rows.device.type == "cuda":
            if hasattr(self.get_base_layer(), "dequantize_expert"):
                weights = torch.stack([self._expert_weights(e)[index] for e in range(self.num_experts)])
            else:
                weights = self._expert_weights(slice(None))[index]
            out = grouped_projection(rows, weights, counts)
            for adapter in adapters:
                a, b = self._full_factor(adapter, "lora_A", which), self._full_factor(adapter, "lora_B", which)
                hidden = grouped_projection(self.lora_dropout[adapter](rows), a, counts)
                out = out + (grouped_projection(hidden, b, counts) * self.scaling[adapter]).to(out.dtype)
            return out
        # Unbind the LoRA factors once, so that the backward does not build a full-size gradient per expert slice.
        factors = {}
        for adapter in adapters:
            slots = self._expert_slots[adapter]
            a = getattr(self.lora_A[adapter], which).unbind(0)
            b = getattr(self.lora_B[adapter], which).unbind(0)
            factors[adapter] = (slots, a, b)

        def expert_output(expert: int, expert_rows: torch.Tensor) -> torch.Tensor:
            out = linear(expert_rows, self._expert_weights(expert)[index])
            for adapter, (slots, a, b) in factors.items():
                if expert in slots:
                    delta = self._lora_delta(adapter, expert_rows, a[slots[expert]], b[slots[expert]])
                    out = out + delta.to(out.dtype)
            return out

        out_features = 2 * self.intermediate_dim if which == "gate_up" else self.hidden_dim
        return looped_projection(rows, counts, expert_output, out_features)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
