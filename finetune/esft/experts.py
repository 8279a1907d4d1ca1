"""Training only the selected experts: the selected rows of each layer's fused expert tensors move into their own
trainable `[S, ...]` parameters, so gradients and optimizer state exist only for them (a run training 10% of the
experts pays ~10% of the optimizer memory), while every other weight stays frozen and bit-identical."""

import functools

import torch
from torch import nn

from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoEExperts

from ..expert_compute import grouped_projection, linear, looped_projection, sorted_experts_forward
from .adapter import is_non_expert_parameter, validate_expert_config
from .full_parameters import gathered


class _EveryStepGradients(torch.autograd.Function):
    """Identity on the trained expert weights, plus a zero `anchor` that the layer adds to its output.

    Through the anchor the weights are in every step's graph, so their backward runs and hands each weight a gradient
    (zeros for experts that got no token) even when no token reached a trained expert: on one rank of a multi-process
    run (DDP and ZeRO reduce every gradient, FSDP2 reduce-scatters per layer and waits for every rank), or in a whole
    micro-batch. All trained weights of a layer get their gradient from this one node, at once and in the same order
    on every rank, whatever the routing (ZeRO-2 packs gradients into its buckets in the order they arrive)."""

    @staticmethod
    def forward(ctx, *weights):
        return (weights[0].new_zeros(()), *(weight.view_as(weight) for weight in weights))

    @staticmethod
    def backward(ctx, grad_anchor, *grads):
        return grads  # unused outputs arrive as zeros (autograd materializes them)


class ESFTExperts(nn.Module):
    """A layer's routed experts with the selected ones trainable (`gate_up_proj [S, 2I, H]`, `down_proj [S, H, I]`)
    and the others read from the frozen fused tensors of `frozen`."""

    def __init__(self, experts: DeepseekMoEExperts, expert_ids: list[int]):
        super().__init__()
        self.frozen = experts.requires_grad_(False)
        self.num_experts, self.act_fn = experts.num_experts, experts.act_fn
        expert_ids = sorted(expert_ids)
        self.slots = {expert: slot for slot, expert in enumerate(expert_ids)}
        device = experts.gate_up_proj.device
        # A model being loaded for FSDP2 on a rank other than 0 is on the meta device; an index buffer must be real.
        ids = torch.tensor(expert_ids, dtype=torch.long, device="cpu" if device.type == "meta" else device)
        self.register_buffer("expert_ids", ids, persistent=False)
        # Under ZeRO-3 the fused tensors are partitioned: gather them to copy the selected rows out.
        with gathered([experts.gate_up_proj, experts.down_proj]):
            self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[expert_ids].clone())
            self.down_proj = nn.Parameter(experts.down_proj.detach()[expert_ids].clone())

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of one expert, trained or frozen."""
        if expert in self.slots:
            return self.gate_up_proj[self.slots[expert]], self.down_proj[self.slots[expert]]
        return self.frozen.gate_up_proj[expert], self.frozen.down_proj[expert]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        gate_up, down, anchor = self.gate_up_proj, self.down_proj, None
        if torch.is_grad_enabled() and (gate_up.requires_grad or down.requires_grad):
            anchor, gate_up, down = _EveryStepGradients.apply(gate_up, down)
        project = functools.partial(self._project, weights=(gate_up, down))
        output = sorted_experts_forward(hidden_states, top_k_index, top_k_weights, self.num_experts, self.act_fn,
                                        project)
        return output if anchor is None else output + anchor.to(output.dtype)

    def _project(self, which: str, rows: torch.Tensor, counts: torch.Tensor, grouped: bool | None = None,
                 weights: tuple[torch.Tensor, torch.Tensor] | None = None):
        gate_up, down = weights or (self.gate_up_proj, self.down_proj)
        trained = gate_up if which == "gate_up" else down
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
