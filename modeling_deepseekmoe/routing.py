"""The routing record: what every router of a DeepSeekMoE decided in a forward, captured once, for everything that
reads routing (training callbacks, ESFT scoring, the routing analysis).

    with record_routing(model) as routing:
        model(input_ids)
    routing.outputs[layer].top_k_index     # [N, K] experts of each flattened token in that MoE layer
    routing.expert_counts(token_weight)    # {layer: [E] routing slots per expert}
    routing.expert_weight_sums(mask)       # {layer: [E] summed top-k weights per expert}

The routers (`DeepseekMoEGate`) return `(router_logits, scores, top_k_weights, top_k_index)` and the MoE block hands
the last two to its experts; a forward hook on the block's router sees exactly that tuple, after any hook registered
before it that changes the routing (the analysis' ablations). Layers are found by module name (`layers.<i>.mlp`), so
PEFT-wrapped, ESFT-wrapped and quantized models are read the same way. Gradient checkpointing runs a router again in
the backward: the record then holds the same values again (overwritten, never added).
"""

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .modeling_deepseekmoe import DeepseekMoESparseMoeBlock, expert_slot_counts


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_MOE_BLOCK_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")


class RouterOutput(NamedTuple):
    router_logits: torch.Tensor | None  # [N, E] (None when the record was told not to keep it)
    scores: torch.Tensor | None  # [N, E] softmax probabilities
    top_k_weights: torch.Tensor  # [N, K]
    top_k_index: torch.Tensor  # [N, K]


# listener(layer, moe_block, router_input [N, H], RouterOutput), called inside the forward
RouterListener = Callable[[int, nn.Module, torch.Tensor, RouterOutput], None]


def decoder_layer_index(name: str) -> int:
    """The decoder layer a module or tensor name belongs to (`...layers.<i>...`, PEFT prefixes included)."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"{name!r} names no decoder layer (no 'layers.<index>' in it).")
    return int(match.group(1))


def moe_blocks(model: nn.Module) -> dict[int, DeepseekMoESparseMoeBlock]:
    """The MoE blocks of a DeepSeekMoE model (wrapped or not), keyed by decoder layer index, in layer order."""
    blocks = {
        int(match.group(1)): module
        for name, module in model.named_modules()
        if isinstance(module, DeepseekMoESparseMoeBlock) and (match := _MOE_BLOCK_NAME.search(name))
    }
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no MoE layer (no layers.N.mlp with a router and routed experts); pass a "
            "DeepSeekMoE model with routed experts."
        )
    return dict(sorted(blocks.items()))


def expert_counts(top_k_index: torch.Tensor, num_experts: int, token_weight: torch.Tensor | None = None):
    """[E] float32: routing slots per expert; each (token, k) slot counts its token's weight (1 if not given, 0 for
    padding). The model's own count (`expert_slot_counts`, what its balance loss counts with) over one segment."""
    return expert_slot_counts(top_k_index, num_experts, token_weight)[0]


def expert_weight_sums(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, token_weight: torch.Tensor | None = None
):
    """[E] float32: the top-k routing weights each expert received, summed (each token's weighted by
    `token_weight`)."""
    values = top_k_weights.float()
    if token_weight is not None:
        values = values * token_weight.to(device=values.device, dtype=torch.float32)[:, None]
    sums = torch.zeros(num_experts, device=values.device, dtype=torch.float32)
    return sums.index_add_(0, top_k_index.reshape(-1), values.reshape(-1))


class RoutingRecord:
    """Forward hooks on the routers of `layers` (default: every MoE layer) that keep each layer's latest
    `RouterOutput` (detached; `keep_scores=False` leaves out the [N, E] logits and probabilities) and call
    `listener` with every router call. `training_only` ignores forwards in eval mode. Use as a context manager, or
    `attach()` / `detach()`."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] | None = None,
        listener: RouterListener | None = None,
        keep: bool = True,
        keep_scores: bool = True,
        training_only: bool = False,
    ):
        blocks = moe_blocks(model)
        if layers is not None:
            missing = [layer for layer in layers if layer not in blocks]
            if missing:
                raise ValueError(f"Layer(s) {missing} are not MoE layers of this model (MoE layers: {list(blocks)}).")
            blocks = {layer: blocks[layer] for layer in layers}
        self.blocks = blocks
        config = next(iter(blocks.values())).config
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.listener, self.keep, self.keep_scores, self.training_only = listener, keep, keep_scores, training_only
        self.outputs: dict[int, RouterOutput] = {}
        self._handles: list = []

    @property
    def layers(self) -> list[int]:
        return list(self.blocks)

    def attach(self) -> "RoutingRecord":
        self.detach()
        self._handles = [block.gate.register_forward_hook(self._hook(layer, block)) for layer, block in
                         self.blocks.items()]  # fmt: skip
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.outputs = {}

    def __enter__(self) -> "RoutingRecord":
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def _hook(self, layer: int, block: nn.Module):
        def hook(module, args, output):
            if self.training_only and not module.training:
                return
            routed = RouterOutput(*output)
            if self.listener is not None:
                self.listener(layer, block, args[0], routed)
            if self.keep:
                logits, scores = (routed.router_logits, routed.scores) if self.keep_scores else (None, None)
                self.outputs[layer] = RouterOutput(
                    *(None if t is None else t.detach() for t in (logits, scores, *routed[2:]))
                )

        return hook

    # ---- per-expert load of the recorded forward ----------------------------------------------------------------

    def expert_counts(self, token_weight: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """{layer: [E] routing slots per expert} of the recorded forward (see `expert_counts`)."""
        return {layer: expert_counts(out.top_k_index, self.num_experts, _matching(token_weight, out))
                for layer, out in self.outputs.items()}  # fmt: skip

    def expert_weight_sums(self, token_weight: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """{layer: [E] summed top-k weights per expert} of the recorded forward."""
        return {layer: expert_weight_sums(out.top_k_index, out.top_k_weights, self.num_experts,
                                          _matching(token_weight, out))
                for layer, out in self.outputs.items()}  # fmt: skip

    def load(self, token_weight: torch.Tensor | None = None) -> torch.Tensor:
        """[len(layers), E] routing slots per expert, in `layers` order (zeros for a layer that did not run)."""
        counts = self.expert_counts(token_weight)
        device = next(iter(counts.values())).device if counts else torch.device("cpu")
        empty = torch.zeros(self.num_experts, device=device)
        return torch.stack([counts.get(layer, empty).to(device) for layer in self.layers])


def _matching(token_weight: torch.Tensor | None, output: RouterOutput) -> torch.Tensor | None:
    """`token_weight` flattened, or an error if it does not have one value per routed token."""
    if token_weight is None:
        return None
    token_weight = token_weight.reshape(-1)
    if token_weight.numel() != output.top_k_index.shape[0]:
        raise ValueError(
            f"token_weight has {token_weight.numel()} values for {output.top_k_index.shape[0]} routed tokens; pass "
            "one weight per token of the batch, flattened as [batch * sequence]."
        )
    return token_weight


@contextmanager
def record_routing(model: nn.Module, layers: Sequence[int] | None = None, **options) -> Iterator[RoutingRecord]:
    """A `RoutingRecord` attached for the duration of the context (hooks removed on exit, also on an error)."""
    record = RoutingRecord(model, layers, **options)
    with record:
        yield record
