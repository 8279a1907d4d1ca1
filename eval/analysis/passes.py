"""One pass of the model over the data: the loss, and the router calls handed to streaming collectors batch by
batch (nothing is kept between batches except what the collectors accumulate)."""

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from modeling_deepseekmoe.routing import RouterOutput, moe_blocks, record_routing

from .data import EncodedSample, iter_batches, num_batches
from .options import check_moe_layer


@dataclass
class BatchContext:
    """The current batch, flattened the way the MoE blocks flatten it (`[B, T] -> [B * T]`)."""

    token_mask: torch.Tensor  # [N] bool: real (non-padding) tokens
    token_ids: torch.Tensor  # [N] long
    domain_masks: dict[str, torch.Tensor]  # domain -> [N] bool (real tokens of that domain)
    _on_device: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_batch(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, domains: list[str]) -> "BatchContext":
        seq_len = input_ids.shape[1]
        token_mask = attention_mask.bool().reshape(-1)
        row_of_token = torch.arange(input_ids.shape[0]).repeat_interleave(seq_len)
        domain_masks = {}
        for domain in dict.fromkeys(domains):
            rows = torch.tensor([d == domain for d in domains])
            domain_masks[domain] = token_mask & rows[row_of_token]
        return cls(token_mask, input_ids.reshape(-1), domain_masks)

    def to(self, device: torch.device) -> "BatchContext":
        """This context on `device` (cached: the MoE layers of a multi-GPU model sit on several devices)."""
        if self.token_mask.device == device:
            return self
        if device not in self._on_device:
            masks = {domain: mask.to(device) for domain, mask in self.domain_masks.items()}
            self._on_device[device] = BatchContext(self.token_mask.to(device), self.token_ids.to(device), masks)
        return self._on_device[device]


class Collector(Protocol):
    """Receives every router call of its `layers` (None: all MoE layers) with the batch it belongs to."""

    layers: Sequence[int] | None

    def on_gate(
        self, layer: int, block: nn.Module, hidden_states: torch.Tensor, output: RouterOutput, batch: BatchContext
    ) -> None: ...


class LossResult(NamedTuple):
    loss: float  # mean next-token cross-entropy over the real tokens (nats)
    num_tokens: int  # predicted tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _collector_layers(model: nn.Module, collectors: Sequence[Collector]) -> list[int] | None:
    wanted = [collector.layers for collector in collectors]
    if any(layers is None for layers in wanted):
        return None
    moe_layers = list(moe_blocks(model))
    return sorted({check_moe_layer(layer, moe_layers) for layers in wanted for layer in layers})


@torch.no_grad()
def run_data_pass(
    model: nn.Module,
    samples: Sequence[EncodedSample],
    batch_size: int = 4,
    pad_token_id: int = 0,
    collectors: Sequence[Collector] = (),
    compute_loss: bool = True,
    progress: bool = True,
    desc: str = "routing",
) -> LossResult | None:
    """Run the model over `samples` in batches; collectors see each router call, and the mean next-token loss over the
    real tokens is returned (None with `compute_loss=False`). Padding never reaches the loss or the collectors."""
    current: list[BatchContext] = []

    def on_gate(layer, block, hidden_states, output):
        batch = current[0].to(output.scores.device)
        for collector in collectors:
            if collector.layers is None or layer in collector.layers:
                collector.on_gate(layer, block, hidden_states, output, batch)

    was_training, device = model.training, input_device(model)
    model.eval()
    total_loss, total_tokens = 0.0, 0
    batches = iter_batches(samples, batch_size, pad_token_id)
    recording = nullcontext()
    if collectors:
        recording = record_routing(model, _collector_layers(model, collectors), listener=on_gate, keep=False)
    try:
        with recording:
            for batch in tqdm(batches, total=num_batches(samples, batch_size), desc=desc, disable=not progress):
                current[:] = [BatchContext.from_batch(batch.input_ids, batch.attention_mask, batch.domains)]
                input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
                labels = input_ids.masked_fill(attention_mask == 0, -100) if compute_loss else None
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
                if compute_loss:
                    predicted = int((labels[:, 1:] != -100).sum())
                    if predicted:
                        total_loss += float(outputs.loss) * predicted
                        total_tokens += predicted
    finally:
        model.train(was_training)
    if not compute_loss:
        return None
    if total_tokens == 0:
        raise ValueError("No text has two or more tokens, so there is no next-token loss; use longer texts.")
    return LossResult(total_loss / total_tokens, total_tokens)


def evaluate_loss(
    model: nn.Module,
    samples: Sequence[EncodedSample],
    batch_size: int = 4,
    pad_token_id: int = 0,
    progress: bool = True,
    desc: str = "loss",
) -> LossResult:
    """Mean next-token cross-entropy of the model on `samples` (under whatever routing override is active)."""
    return run_data_pass(model, samples, batch_size, pad_token_id, progress=progress, desc=desc)
