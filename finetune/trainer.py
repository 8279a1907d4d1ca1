"""`DeepseekMoESFTTrainer`: TRL's `SFTTrainer` for DeepSeekMoE (SFT and ESFT share it).

What it changes, and why:
- The aux loss. DeepSeekMoE injects its own balance loss into the gradient inside every MoE layer (training mode,
  `config.aux_loss_alpha > 0`), so TRL must add nothing: TRL's `router_aux_loss_coef` is refused (it would add
  Mixtral's formula, which also needs a `num_experts` the config does not have) and `config.output_router_logits`
  is kept False so TRL's fused LM head never computes it. The injected value is logged as `aux_loss` by
  `MoETrainingMonitor`, together with the expert load (see callbacks.py).
- Pre-tokenized data. `finetune.data.prepare_sft_dataset` applies the loss masks itself (`labels`), so TRL's
  conversational-only checks for `assistant_only_loss` are bypassed for datasets that already carry `labels`.
- Checkpoints are written atomically: into `<output_dir>/.staging/checkpoint-N`, then renamed, so an interruption
  never leaves a half-written `checkpoint-N` for `resume_from_checkpoint` to pick up.
"""

import json
import os
import shutil
from contextlib import contextmanager

from transformers.trainer_utils import rotate_checkpoints
from trl import SFTTrainer

from .callbacks import MoETrainingMonitor


STAGING_DIR = ".staging"


def _unwrapped_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


@contextmanager
def _labels_precomputed(args, dataset):
    """TRL refuses `assistant_only_loss` for a dataset that is not conversational; a tokenized dataset with `labels`
    already has the mask applied, so the flags are switched off while TRL looks at them."""
    columns = getattr(dataset, "column_names", None) or []
    if "labels" not in columns or args is None:
        yield
        return
    saved = args.assistant_only_loss, args.completion_only_loss
    args.assistant_only_loss, args.completion_only_loss = False, False
    try:
        yield
    finally:
        args.assistant_only_loss, args.completion_only_loss = saved


class DeepseekMoESFTTrainer(SFTTrainer):
    def __init__(self, model, args=None, *, monitor: MoETrainingMonitor | None = None, **kwargs):
        if args is not None and args.router_aux_loss_coef:
            raise ValueError(
                f"router_aux_loss_coef={args.router_aux_loss_coef} would make TRL add Mixtral's load-balancing loss. "
                "DeepSeekMoE applies its own balance loss inside every MoE layer: set its weight with "
                "--aux_loss_alpha (0 disables it) and leave router_aux_loss_coef unset."
            )
        if not isinstance(model, str):
            _unwrapped_config(model).output_router_logits = False
        with _labels_precomputed(args, kwargs.get("train_dataset")):
            super().__init__(model, args, **kwargs)
        _unwrapped_config(self.model).output_router_logits = False
        self.moe_monitor = monitor or MoETrainingMonitor(self.args.output_dir)
        self.add_callback(self.moe_monitor)

    def training_summary(self, model_args, data_args) -> str:
        args = self.args
        lines = [
            f"- data: `{data_args.dataset_name}` ({data_args.dataset_format} format)",
            f"- steps: {self.state.global_step}, learning rate {args.learning_rate}, "
            f"batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation",
            f"- aux loss alpha: {_unwrapped_config(self.model).aux_loss_alpha}, routers "
            f"{'trained' if model_args.train_router else 'frozen'}",
        ]
        if self.moe_monitor.summary:
            lines.append(f"- run summary: {json.dumps(self.moe_monitor.summary)}")
        return "\n".join(lines)

    def write_model_card(self, model_args, data_args) -> None:
        from deepseekmoe.model_card import write_model_card

        method = "LoRA" if model_args.use_peft else "full fine-tuning"
        if model_args.quantization:
            method = f"QLoRA ({model_args.quantization} base)"
        write_model_card(
            self.args.output_dir,
            "sft",
            model_name=os.path.basename(os.path.normpath(self.args.output_dir)),
            base_model=model_args.model_name_or_path,
            method=method,
            adapter=model_args.use_peft,
            training=self.training_summary(model_args, data_args),
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self.moe_monitor.pop_log_metrics())
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------ atomic checkpoints

    _staging_run_dir: str | None = None

    def _get_output_dir(self, trial):
        if self._staging_run_dir is not None:
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging, name), ignore_errors=True)  # left over from an interrupted save
            os.makedirs(staging, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            if not os.listdir(staging):
                os.rmdir(staging)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()
