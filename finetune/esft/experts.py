"""Training only the selected experts: the selected rows of each layer's fused expert tensors move into their own
trainable `[S, ...]` parameters, so gradients and optimizer state exist only for them (a run training 10% of the
experts pays ~10% of the optimizer memory), while every other weight stays frozen and bit-identical."""

import torch
from torch import nn

from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoEExperts

from ..expert_compute import grouped_projection, linear, looped_projection, sorted_experts_forward
from .adapter import is_non_expert_parameter, validate_expert_config


class ESFTExperts(nn.Module):
    """A layer's routed experts with the selected ones trainable (`gate_up_proj [S, 2I, H]`, `down_proj [S, H, I]`)
    and the others read from the frozen fused tensors of `frozen`."""

    def __init__(self, experts: DeepseekMoEExperts, expert_ids: list[int]):
        super().__init__()
        self.frozen = experts.requires_grad_(False)
        self.num_experts, self.act_fn = experts.num_experts, experts.act_fn
        ids = torch.tensor(sorted(expert_ids), dtype=torch.long, device=experts.gate_up_proj.device)
        self.register_buffer("expert_ids", ids, persistent=False)
        self.slots = {int(e): i for i, e in enumerate(ids.tolist())}
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[ids].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[ids].clone())

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of one expert, trained or frozen."""
        if expert in self.slots:
            return self.gate_up_proj[self.slots[expert]], self.down_proj[self.slots[expert]]
        return self.frozen.gate_up_proj[expert], self.frozen.down_proj[expert]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return sorted_experts_forward(
            hidden_states, top_k_index, top_k_weights, self.num_experts, self.act_fn, self._project
        )

    def _project(self, which: str, rows: torch.Tensor, counts: torch.Tensor, grouped: bool | None = None):
        trained = self.gate_up_proj if which == "gate_up" else self.down_proj
        frozen = self.frozen.gate_up_proj if which == "gate_up" else self.frozen.down_proj
        if grouped if grouped is not None else rows.device.type == "cuda":
            return grouped_projection(rows, frozen.index_copy(0, self.expert_ids, trained), counts)
        pieces = trained.unbind(0)  # once, so the backward builds no full-size gradient per expert

        def expert_output(expert: int, expert_rows: torch.Tensor) -> torch.Tensor:
            slot = self.slots.get(expert)
            return linear(expert_rows, pieces[slot] if slot is not None else frozen[expert])

        return looped_projection(rows, counts, expert_output, frozen.shape[1])

    @torch.no_grad()
    def merge(self) -> DeepseekMoEExperts:
        """The frozen fused module with the trained experts written back into it."""
        self.frozen.gate_up_proj.index_copy_(0, self.expert_ids, self.gate_up_proj.to(self.frozen.gate_up_proj.dtype))
        self.frozen.down_proj.index_copy_(0, self.expert_ids, self.down_proj.to(self.frozen.down_proj.dtype))
        return self.frozen


def prepare_esft_model(model, expert_config: dict):
    """Freeze `model` except what `expert_config` selects (ESFT format): the selected routed experts (moved into
    `ESFTExperts`), plus the shared experts and/or the non-expert modules when the config says so. The routers
    always stay frozen. Returns the model (changed in place)."""
    selection = validate_expert_config(expert_config, model.config)
    model.requires_grad_(False)
    for layer, experts in selection.items():
        mlp = model.model.layers[layer].mlp
        if isinstance(mlp.experts, ESFTExperts):
            raise ValueError(f"Layer {layer} is already prepared for ESFT; merge it (unwrap_esft_model) first.")
        mlp.experts = ESFTExperts(mlp.experts, experts)
    for name, parameter in model.named_parameters():
        if ".mlp.shared_experts." in name and expert_config.get("shared_experts"):
            parameter.requires_grad_(True)
        elif expert_config.get("non_expert_modules") and is_non_expert_parameter(name):
            parameter.requires_grad_(True)
    return model


def unwrap_esft_model(model):
    """Write the trained experts back into the fused tensors and restore the plain expert modules (in place)."""
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, ESFTExperts):
            layer.mlp.experts = experts.merge()
    return model
