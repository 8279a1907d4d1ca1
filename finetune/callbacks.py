"""Trainer callbacks for DeepSeekMoE training: what happens inside the MoE layers, and guard rails.

`MoETrainingMonitor` is one `TrainerCallback` that, through forward hooks (no change to the model or the loss):
- reads DeepSeekMoE's balance loss as the MoE layers injected it (`DeepseekMoESparseMoeBlock.last_aux_loss`, summed
  over layers: the model's `aux_loss` for the same batch) once per micro-batch, after its backward;
- counts the tokens each routed expert of every MoE layer receives (hooks on the `DeepseekMoEGate` modules; padding
  excluded), logs a summary (`moe/load_max_over_mean`, `moe/load_cv`, `moe/idle_experts`), appends the full
  layer x expert load of every logging interval to `expert_load/load.jsonl`, records per rank the steps in which some
  expert got no token there (`expert_load/idle_rank{r}.json`), and draws `expert_load/heatmap.png` at the end;
- stops the run (`TrainingDivergedError`) before the optimizer step when the cross-entropy of a micro-batch is NaN,
  inf or exactly 0, naming the step, the likely cause, whether the weights are still finite and the last checkpoint
  with finite weights (the trainer refuses to save non-finite weights, see `count_nonfinite_parameters`);
- writes `loss_curve.png` and `run_summary.json` (trainable parameters, tokens/s, peak memory) at the end.

Hooks fire again when gradient checkpointing recomputes a layer, so per-micro-batch values are overwritten, never
summed, and committed after the micro-batch's backward (`on_substep_end` / `on_pre_optimizer_step`). Values that
are logged are reduced over ranks at logging time; every rank logs at the same steps.
"""

import json
import logging
import math
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoEModel, DeepseekMoESparseMoeBlock
from modeling_deepseekmoe.routing import RoutingRecord


logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
LOAD_DIR = "expert_load"
MAX_IDLE_RECORDS = 10_000


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN / inf / exactly 0; the message names the step and the likely cause."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _local_values(parameter: torch.Tensor) -> torch.Tensor:
    """What this process holds of a parameter: its ZeRO-3 partition, its FSDP2 shard, or the tensor itself."""
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor
    if hasattr(parameter, "to_local"):
        return parameter.to_local()
    return parameter


def saved_tensors(model: torch.nn.Module):
    """(name, tensor) of everything a save of `model` writes: every parameter (trained or frozen) and persistent
    buffer of a full model; the trained parameters of a PEFT model (its adapter, `modules_to_save` included: the
    frozen base is not written)."""
    if hasattr(model, "peft_config"):
        yield from ((name, p) for name, p in model.named_parameters() if p.requires_grad)
        return
    yield from model.named_parameters()
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield f"{module_name}.{name}" if module_name else name, buffer


def count_nonfinite_tensors(tensors, device=None, limit: int = 3) -> tuple[int, list[str]]:
    """(how many of the floating-point `tensors` ((name, tensor) pairs) hold NaN/inf on any process, up to `limit`
    of their names seen here). Checks each process's own shards; collective when distributed (every process calls
    it)."""
    names = []
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        values = _local_values(tensor)
        if values.numel() and not torch.isfinite(values.detach()).all():
            names.append(name)
    count = torch.tensor([float(len(names))], device=device)
    return int(_all_reduce(count).item()), names[:limit]


def count_nonfinite_parameters(model: torch.nn.Module, device=None, limit: int = 3) -> tuple[int, list[str]]:
    """`count_nonfinite_tensors` over what a save of `model` writes (`saved_tensors`)."""
    return count_nonfinite_tensors(saved_tensors(model), device, limit)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned parameters count with their full size."""
    trainable = total = 0
    for parameter in model.parameters():
        size = getattr(parameter, "ds_numel", parameter.numel())
        total += size
        trainable += size if parameter.requires_grad else 0
    return trainable, total


def peak_memory_bytes(device: torch.device | None = None) -> tuple[int, str]:
    """Peak accelerator memory allocated by torch on `device` (CUDA), else the process's peak resident memory."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_peak_rss"


class MoETrainingMonitor(TrainerCallback):
    def __init__(self, output_dir: str | None = None, plots: bool = True, guard: bool = True):
        self.output_dir = output_dir
        self.plots = plots
        self.guard = guard
        self._handles: list = []
        self._layers: list[int] = []
        self._blocks: list[DeepseekMoESparseMoeBlock] = []
        self._num_experts = 0
        # Per micro-batch, overwritten by each (re)computation, committed after the backward.
        self._routing: RoutingRecord | None = None
        self._batch_loss: torch.Tensor | None = None
        self._batch_label_count: torch.Tensor | None = None
        self._token_weight: torch.Tensor | None = None
        # Committed.
        self._step_loads: list[torch.Tensor] = []
        self._step_losses: list[torch.Tensor] = []
        self._step_label_counts: list[torch.Tensor] = []
        self._interval_load: torch.Tensor | None = None
        self._interval_aux: list[torch.Tensor] = []
        self._total_load: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        self._trained_tokens: torch.Tensor | None = None
        self.idle_records: list[dict] = []
        self._start_time: float | None = None
        self._start_step = 0
        self._trainable: int | None = None
        self._total: int | None = None
        self.summary: dict | None = None
        self._model: torch.nn.Module | None = None
        # Set by the trainer: the checkpoint resumed from, then each one saved (saves refuse non-finite weights).
        self.last_finite_checkpoint: str | None = None

    # ------------------------------------------------------------------------------------------------ hooks

    def attach(self, model: torch.nn.Module) -> None:
        """Hook the routers, the MoE blocks and the top-level model (the module the trainer calls)."""
        self.detach()
        self._blocks = [m for m in model.modules() if isinstance(m, DeepseekMoESparseMoeBlock)]
        if self._blocks:
            self._routing = RoutingRecord(model, keep_scores=False, training_only=True).attach()
            self._layers, self._num_experts = self._routing.layers, self._routing.num_experts
        self._handles.append(model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._model_hook))
        for backbone in (m for m in model.modules() if isinstance(m, DeepseekMoEModel)):
            self._handles.append(backbone.register_forward_pre_hook(self._backbone_pre_hook, with_kwargs=True))

    def detach(self) -> None:
        if self._routing is not None:
            self._routing.detach()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _model_pre_hook(self, module, args, kwargs):
        if not module.training:
            return
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if input_ids is None and args:
            input_ids = args[0]
        if input_ids is None:
            return
        tokens = mask.sum() if mask is not None and mask.dim() == 2 else torch.tensor(input_ids.numel())
        labels = kwargs.get("labels")
        trained = (labels != IGNORE_INDEX).sum() if labels is not None else tokens
        tokens, trained = tokens.to(input_ids.device), trained.to(input_ids.device)
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        self._trained_tokens = trained if self._trained_tokens is None else self._trained_tokens + trained

    def _backbone_pre_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._token_weight = mask.reshape(-1).float() if mask is not None and mask.dim() == 2 else None

    def _model_hook(self, module, args, output):
        if not module.training:
            return
        loss = getattr(output, "loss", None)
        if loss is None:
            return
        self._batch_loss = loss.detach().float()
        label_mask = getattr(output, "label_mask", None)
        self._batch_label_count = label_mask.sum() if label_mask is not None else torch.ones((), device=loss.device)

    # ------------------------------------------------------------------------------------------------ per micro-batch

    def _commit_micro_batch(self) -> None:
        if self._routing is not None and self._routing.outputs:
            weight, routed = self._token_weight, next(iter(self._routing.outputs.values())).top_k_index
            if weight is not None and weight.numel() != routed.shape[0]:
                weight = None  # e.g. inputs_embeds without a 2D mask: every token counts
            self._step_loads.append(self._routing.load(weight))
            self._routing.clear()
        aux = [block.last_aux_loss for block in self._blocks if block.last_aux_loss is not None]
        if aux:
            self._interval_aux.append(torch.stack([a.float().reshape(()) for a in aux]).sum())
        for block in self._blocks:
            block.last_aux_loss = None
        if self._batch_loss is not None:
            self._step_losses.append(self._batch_loss)
            self._step_label_counts.append(self._batch_label_count)
            self._batch_loss = None

    def _end_step(self, args, state) -> None:
        self._commit_micro_batch()
        step = state.global_step + 1
        if self._step_loads:
            step_load = torch.stack(self._step_loads).sum(0)
            self._step_loads = []
            self._interval_load = step_load if self._interval_load is None else self._interval_load + step_load
            self._total_load = step_load if self._total_load is None else self._total_load + step_load
            idle = (step_load == 0).nonzero().tolist()
            if idle and len(self.idle_records) < MAX_IDLE_RECORDS:
                by_layer: dict[str, list[int]] = {}
                for row, expert in idle:
                    by_layer.setdefault(str(self._layers[row]), []).append(expert)
                self.idle_records.append({"step": step, "idle_experts": by_layer})
        if self.guard and self._step_losses:
            self._check_loss(args, step)
        self._step_losses, self._step_label_counts = [], []

    def _check_loss(self, args, step: int) -> None:
        losses = torch.stack(self._step_losses)
        counts = torch.stack(self._step_label_counts).to(losses.device)
        flags = torch.stack([(~torch.isfinite(losses)).any(), ((losses == 0) & (counts > 0)).any()]).float()
        nonfinite, zero = _all_reduce(flags, dist.ReduceOp.MAX if _distributed() else None).tolist()
        if not (nonfinite or zero):
            return
        if nonfinite:
            what = "NaN/inf"
            if getattr(args, "fp16", False):
                cause = (
                    "fp16 overflow: DeepSeekMoE's activations exceed the fp16 range (65504). Train in bf16 (--bf16, "
                    "on GPUs that have it) or in fp32 (--bf16 false --fp16 false)"
                )
            else:
                cause = (
                    "divergence: lower --learning_rate, keep gradient clipping on (--max_grad_norm 1.0) and check the "
                    "data of this step"
                )
        else:
            what = "exactly 0"
            cause = (
                "a collapsed model or broken labels: the cross-entropy of trained tokens cannot be 0 in practice. "
                "This is the 'loss collapses to 0' failure of the original LoRA recipe (degenerate outputs after an "
                "fp16 overflow or a too high learning rate); resume from the last checkpoint in bf16 / fp32 with a "
                "lower --learning_rate"
            )
        weights = f"the weights of step {step - 1} are intact"
        if self._model is not None:
            bad, names = count_nonfinite_parameters(self._model, args.device)
            if bad:
                weights = f"{bad} weight tensors are already NaN/inf, e.g. {', '.join(names) or 'on another rank'}"
        raise TrainingDivergedError(
            f"Training loss became {what} at step {step} (before its optimizer step; {weights}; "
            f"{self._last_finite()}). Likely cause: {cause}."
        )

    def _last_finite(self) -> str:
        if self.last_finite_checkpoint is None:
            return "no checkpoint with finite weights was saved"
        return (f"the last checkpoint with finite weights is {self.last_finite_checkpoint}: resume from it with "
                f"--resume_from_checkpoint {self.last_finite_checkpoint}")

    def nonfinite_weights_message(self, step: int, count: int, names: list[str], what_happened: str) -> str:
        """Why a save was refused: after the optimizer step of `step`, `count` tensors to be saved are NaN/inf."""
        return (
            f"Training diverged: after the optimizer step of step {step}, {count} weight tensors are NaN/inf "
            f"(e.g. {', '.join(names) or 'on another rank'}); {what_happened}, and {self._last_finite()}. Likely "
            "cause: divergence: lower --learning_rate and keep gradient clipping on (--max_grad_norm 1.0)."
        )

    # ------------------------------------------------------------------------------------------------ logging

    def pop_log_metrics(self) -> dict[str, float]:
        """The MoE metrics since the last log, reduced over ranks. Collective: every rank calls it at each log."""
        metrics: dict[str, float] = {}
        if self._interval_aux:
            aux = torch.stack(self._interval_aux).mean().reshape(1)
            metrics["aux_loss"] = (_all_reduce(aux) / _world_size()).item()
            self._interval_aux = []
        if self._interval_load is not None:
            load = _all_reduce(self._interval_load.clone())
            self._interval_load = None
            metrics.update(load_summary(load))
            self._append_load_record(load)
        return metrics

    def _append_load_record(self, load: torch.Tensor) -> None:
        if self._state is None or not self._state.is_world_process_zero or self.output_dir is None:
            return
        directory = Path(self.output_dir) / LOAD_DIR
        directory.mkdir(parents=True, exist_ok=True)
        record = {"step": self._state.global_step, "layers": self._layers, "load": load.cpu().tolist()}
        with open(directory / "load.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------------------ events

    _state = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._state = state
        self.output_dir = self.output_dir or args.output_dir
        if model is not None:
            self._model = model
            self.attach(model)
            self._trainable, self._total = count_parameters(model)
        self._start_time, self._start_step = time.perf_counter(), state.global_step
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)

    def on_substep_end(self, args, state, control, **kwargs):
        self._commit_micro_batch()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._end_step(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()
        self._model = None
        elapsed = time.perf_counter() - (self._start_time or time.perf_counter())
        device = args.device
        counters = torch.stack(
            [
                (self._tokens if self._tokens is not None else torch.zeros(())).float().to(device),
                (self._trained_tokens if self._trained_tokens is not None else torch.zeros(())).float().to(device),
            ]
        )
        tokens, trained_tokens = _all_reduce(counters).tolist()
        peak, peak_kind = peak_memory_bytes(device)
        peak = _all_reduce(torch.tensor([float(peak)], device=device), dist.ReduceOp.MAX if _distributed() else None)
        total_load = None
        if self._total_load is not None:
            total_load = _all_reduce(self._total_load.clone()).cpu()
        if self.output_dir is not None:
            directory = Path(self.output_dir) / LOAD_DIR
            directory.mkdir(parents=True, exist_ok=True)
            rank = dist.get_rank() if _distributed() else 0
            (directory / f"idle_rank{rank}.json").write_text(
                json.dumps({"rank": rank, "layers": self._layers, "records": self.idle_records}) + "\n"
            )
        if not state.is_world_process_zero:
            return
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        mean_loss = next((e["train_loss"] for e in reversed(state.log_history) if "train_loss" in e), None)
        self.summary = {
            "steps": state.global_step - self._start_step,
            "global_step": state.global_step,
            "trainable_params": self._trainable,
            "total_params": self._total,
            "trainable_percent": round(100 * self._trainable / max(self._total, 1), 4) if self._total else None,
            "train_seconds": round(elapsed, 3),
            "tokens": int(tokens),
            "trained_tokens": int(trained_tokens),
            "tokens_per_second": round(tokens / elapsed, 2) if elapsed > 0 else None,
            "peak_memory_gib": round(peak.item() / 1024**3, 3),
            "peak_memory_kind": peak_kind,
            "world_size": _world_size(),
            "final_logged_loss": losses[-1] if losses else None,
            "mean_train_loss": mean_loss,
        }
        if self.output_dir is None:
            return
        output = Path(self.output_dir)
        (output / "run_summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        logger.warning("Run summary: %s", json.dumps(self.summary))
        if total_load is not None:
            (output / LOAD_DIR / "total.json").write_text(
                json.dumps({"layers": self._layers, "load": total_load.tolist()}) + "\n"
            )
        if self.plots:
            if total_load is not None:
                plot_expert_load(total_load, self._layers, output / LOAD_DIR / "heatmap.png")
            plot_loss_curve(state.log_history, output / "loss_curve.png")


def load_summary(load: torch.Tensor) -> dict[str, float]:
    """Imbalance of a [layers, experts] token-count matrix: the worst layer's max/mean, the mean coefficient of
    variation over layers, and how many (layer, expert) pairs got no token."""
    load = load.float()
    mean = load.mean(dim=1, keepdim=True).clamp(min=1e-9)
    return {
        "moe/load_max_over_mean": (load.max(dim=1, keepdim=True).values / mean).max().item(),
        "moe/load_cv": (load.std(dim=1, unbiased=False, keepdim=True) / mean).mean().item(),
        "moe/idle_experts": float((load == 0).sum().item()),
    }


def plot_expert_load(load: torch.Tensor, layers: list[int], path: Path) -> Path:
    """Layer x expert heatmap of each expert's share of its layer's tokens relative to uniform (1 = balanced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = load.float()
    relative = load / load.sum(dim=1, keepdim=True).clamp(min=1e-9) * load.shape[1]
    height = max(2.5, 0.25 * len(layers) + 1.5)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.15 * load.shape[1] + 3), height))
    image = axis.imshow(relative.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_xlabel("routed expert")
    axis.set_ylabel("layer")
    axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axis.set_title("Expert load (token share x experts; 1 = uniform)")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_loss_curve(log_history: list[dict], path: Path) -> Path | None:
    """Training (and eval) loss per step, and the aux loss when it was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and math.isfinite(e["loss"])]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    aux = [(e["step"], e["aux_loss"]) for e in log_history if "aux_loss" in e]
    figure, axes = plt.subplots(2 if aux else 1, 1, figsize=(7, 6 if aux else 4), sharex=True, squeeze=False)
    axes[0, 0].plot(*zip(*train), label="train loss")
    if evaluation:
        axes[0, 0].plot(*zip(*evaluation), marker="o", label="eval loss")
    axes[0, 0].set_ylabel("cross-entropy")
    axes[0, 0].legend()
    if aux:
        axes[1, 0].plot(*zip(*aux), color="tab:red")
        axes[1, 0].set_ylabel("aux (balance) loss")
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
