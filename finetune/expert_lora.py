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

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from transformers.integrations.moe import _grouped_mm


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
        self.lora_expert_ids = BufferDict(persistent=True)  # saved with the adapter: which experts carry LoRA
        self._expert_selection = expert_ids
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.hidden_dim, module.hidden_dim

    def _selected_experts(self, target_name: str) -> list[int]:
        if self._expert_selection is None:
            return list(range(self.num_experts))
        layer = int(target_name.split("layers.")[-1].split(".")[0])
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
        self._init_lora(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name, device=self._base_device())
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

        num_tokens, top_k = top_k_index.shape
        flat_experts = top_k_index.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        rows = hidden_states[order // top_k]
        if rows.device.type == "cuda":
            projections = self._grouped_projections(adapters, counts)
        else:
            projections = self._looped_projections(adapters, counts.tolist())
        gate_up = projections("gate_up", rows)
        gate, up = gate_up.chunk(2, dim=-1)
        out = projections("down", base.act_fn(gate) * up)
        weighted = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
        unsorted = torch.empty_like(weighted)
        unsorted[order] = weighted
        return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _looped_projections(self, adapters: list[str], counts: list[int]):
        """CPU: one matmul per hit expert; LoRA factors unbound once so their gradients are not full-size per slice."""
        bounds, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                bounds.append((expert, start, start + count))
            start += count
        lora = {}
        for adapter in adapters:
            slot = {int(e): i for i, e in enumerate(self.lora_expert_ids[adapter].tolist())}
            lora[adapter] = (slot, self.lora_A[adapter], self.lora_B[adapter])

        def project(which: str, rows: torch.Tensor) -> torch.Tensor:
            unbound = {
                adapter: (getattr(a, which).unbind(0), getattr(b, which).unbind(0))
                for adapter, (_, a, b) in lora.items()
            }
            pieces = []
            for expert, start, end in bounds:
                x = rows[start:end]
                weight = self._expert_weights(expert)[0 if which == "gate_up" else 1]
                y = F.linear(x, weight.to(x.dtype))
                for adapter, (slot, _, _) in lora.items():
                    if expert in slot:
                        a, b = unbound[adapter][0][slot[expert]], unbound[adapter][1][slot[expert]]
                        delta = F.linear(F.linear(self.lora_dropout[adapter](x.to(a.dtype)), a), b)
                        y = y + (delta * self.scaling[adapter]).to(y.dtype)
                pieces.append(y)
            return torch.cat(pieces) if pieces else rows.new_zeros(0, self._out_features(which))

        return project

    def _grouped_projections(self, adapters: list[str], counts: torch.Tensor):
        """GPU: grouped GEMMs over the sorted rows, no host synchronisation."""
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        base = self.get_base_layer()

        def base_weight(which: str) -> torch.Tensor:
            if hasattr(base, "dequantize_expert"):
                return torch.stack([self._expert_weights(e)[0 if which == "gate_up" else 1]
                                    for e in range(self.num_experts)])
            return getattr(base, "gate_up_proj" if which == "gate_up" else "down_proj")

        def project(which: str, rows: torch.Tensor) -> torch.Tensor:
            y = _grouped_mm(rows, base_weight(which).to(rows.dtype).transpose(-2, -1), offsets)
            for adapter in adapters:
                a = self._full_factor(adapter, "lora_A", which)
                b = self._full_factor(adapter, "lora_B", which)
                hidden = _grouped_mm(self.lora_dropout[adapter](rows.to(a.dtype)), a.transpose(-2, -1), offsets)
                y = y + (_grouped_mm(hidden, b.transpose(-2, -1), offsets) * self.scaling[adapter]).to(y.dtype)
            return y

        return project

    def _out_features(self, which: str) -> int:
        return 2 * self.intermediate_dim if which == "gate_up" else self.hidden_dim

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
