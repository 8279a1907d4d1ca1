"""`DeepseekMoESFTTrainer`: TRL's `SFTTrainer` for DeepSeekMoE (SFT and ESFT share it).

What it changes, and why:
- The aux loss. DeepSeekMoE injects its own balance loss into the gradient inside every MoE layer (training mode,
  `config.aux_loss_alpha > 0`), so TRL must add nothing: TRL's `router_aux_loss_coef` is refused (it would add
  Mixtral's formula, which also needs a `num_experts` the config does not have) and `config.output_router_logits`
  is kept False so TRL's fused LM head never computes it. The injected value is logged as `aux_loss` by
  `MoETrainingMonitor`, together with the expert load (see callbacks.py).
- Pre-tokenized data. `finetune.data.prepare_sft_dataset` applies the loss masks itself (`labels`), so TRL's
  conversational-only checks for `assistant_only_loss` are bypassed for datasets that already carry `labels`.
- Checkpoints go through `modeling_deepseekmoe.checkpoint_writer`: written into `<output_dir>/.staging/checkpoint-N`,
  validated, then renamed, and rotated out by renaming before deletion, so an interruption never leaves a half-written
  (or half-deleted) `checkpoint-N` for `resume_from_checkpoint` to pick up. Weights that are NaN/inf are never saved:
  the save stops the run instead (`TrainingDivergedError`, naming the last checkpoint with finite weights); every
  tensor the save writes is checked (`tensors_to_save`: frozen parameters and persistent buffers too). The staged
  `trainer_state.json` records the best checkpoint under its final name, which a resumed run reads.
- Model cards. The run's card (`deepseekmoe.model_cards`) is written when the run finishes, from what it was; TRL's
  draft card (at every checkpoint) and PEFT's (in every adapter folder) are not written, so an interrupted run leaves
  no card claiming a generic fine-tune of an unknown base.
- Resume and `--load_best_model_at_end` read a full model's checkpoint with `from_pretrained` (the released
  per-expert layout converted to the fused experts); the Trainer's own reader would leave the routed experts as they
  were. Adapters (LoRA, QLoRA, ESFT) and DeepSpeed / FSDP checkpoints are read by their own loaders.
"""

import copy
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints
from trl import SFTTrainer

from modeling_deepseekmoe import checkpoint_writer

from .callbacks import MoETrainingMonitor, TrainingDivergedError, count_nonfinite_tensors, saved_tensors


logger = logging.getLogger(__name__)
STAGING_DIR = ".staging"
FULL_MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _unwrapped_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _restore_dtypes(model, dtypes: dict) -> None:
    """PEFT's `load_adapter` rebuilds the adapter in float32 (a QLoRA run trains it in the compute dtype): put every
    parameter back in the dtype the run had, so a resumed run computes as the uninterrupted one."""
    for name, parameter in model.named_parameters():
        if name in dtypes and parameter.dtype != dtypes[name] and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtypes[name])


@contextmanager
def _without_peft_card(model):
    """PEFT's `save_pretrained` writes (or amends) a generic README.md into every adapter folder; the run's own card
    is written when it finishes (`write_model_card`)."""
    if not hasattr(model, "create_or_update_model_card"):
        yield
        return
    model.create_or_update_model_card = lambda output_dir: None
    try:
        yield
    finally:
        del model.create_or_update_model_card


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

    def training_setup(self, model_args, data_args, **extra):
        """What this run was (`deepseekmoe.model_cards.card.TrainingSetup`): method, LoRA settings or ESFT experts,
        data, steps trained, learning rate, precision, quantization, the base as an absolute path."""
        from deepseekmoe.model_cards.card import training_setup

        return training_setup(model_args, data_args, self.args, steps=self.state.global_step,
                              aux_loss_alpha=_unwrapped_config(self.model).aux_loss_alpha,
                              summary=self.moe_monitor.summary, **extra)  # fmt: skip

    def write_model_card(self, model_args, data_args) -> None:
        from deepseekmoe.model_cards.card import write_training_card

        write_training_card(self.args.output_dir, self.training_setup(model_args, data_args))

    def create_model_card(self, *args, **kwargs) -> None:
        """Not TRL's draft card (written into output_dir at every checkpoint: "fine-tuned version of [None]"): the
        card is `write_model_card`'s, written when the run finishes."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self.moe_monitor.pop_log_metrics())
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self.moe_monitor.last_finite_checkpoint = str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------------------------------ loading checkpoints

    def _reads_full_model(self, checkpoint: str) -> bool:
        """Whether `checkpoint` is a full model this trainer reads itself: single process or DDP (DeepSpeed and FSDP
        read their own state), not an adapter."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return False
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config"):
            return False
        folder = Path(checkpoint)
        return (folder / "config.json").is_file() and any((folder / name).is_file() for name in FULL_MODEL_WEIGHTS)

    def load_full_model_weights(self, checkpoint: str, model=None) -> None:
        """Every weight of `checkpoint` into the model in place, read by `from_pretrained` (released or fused layout,
        checked against the config) and copied over strictly: no tensor is left as it was."""
        model = self.accelerator.unwrap_model(model or self.model)
        dtype = next(model.parameters()).dtype
        loaded = type(model).from_pretrained(checkpoint, config=copy.deepcopy(model.config), dtype=dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self._reads_full_model(resume_from_checkpoint):
            logger.info("Loading model from %s.", resume_from_checkpoint)
            self.load_full_model_weights(resume_from_checkpoint, model)
        else:
            unwrapped = self.accelerator.unwrap_model(model or self.model)
            dtypes = {name: p.dtype for name, p in unwrapped.named_parameters()}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            _restore_dtypes(unwrapped, dtypes)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self._reads_full_model(best):
            logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
            self.load_full_model_weights(best)
        else:
            super()._load_best_model()

    # ------------------------------------------------------------------------------------------ finite weights

    def tensors_to_save(self, model):
        """(name, tensor) of what a save writes (`callbacks.saved_tensors`: a full model whole, a PEFT model's
        adapter)."""
        return saved_tensors(model)

    def refuse_non_finite_weights(self, saving: str) -> None:
        """Raise `TrainingDivergedError` (on every process) when a tensor the save writes holds NaN/inf, before
        `saving` (what was about to be written) is written. Collective: every process calls it."""
        model = self.accelerator.unwrap_model(self.model)
        bad, names = count_nonfinite_tensors(self.tensors_to_save(model), self.args.device)
        if bad:
            raise TrainingDivergedError(self.moe_monitor.nonfinite_weights_message(
                self.state.global_step, bad, names, f"{saving} was not saved"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not _internal_call:  # a checkpoint's weights were checked before its save began
            self.refuse_non_finite_weights(output_dir or self.args.output_dir)
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        with _without_peft_card(self.accelerator.unwrap_model(self.model)):
            super()._save(output_dir, state_dict)

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
        final, staged = os.path.join(run_dir, name), os.path.join(staging, name)
        main_process = self.args.should_save
        self.refuse_non_finite_weights(final)  # before anything is written
        if main_process:
            checkpoint_writer.prepare_staging(final, staged)  # removes what an interrupted save left
        self.accelerator.wait_for_everyone()
        config = _unwrapped_config(self.accelerator.unwrap_model(self.model))
        self._staging_run_dir = staging
        try:
            with checkpoint_writer.reporting_disk_full(final, staging if main_process else None):
                super()._save_checkpoint(model, trial)
                self.accelerator.wait_for_everyone()
                self._record_best_under_final_name(staging, run_dir, staged)
                if main_process:
                    checkpoint_writer.commit_staging(
                        staged, final, validate=lambda folder: checkpoint_writer.validate_saved_model(folder, config)
                    )
        finally:
            self._staging_run_dir = None
            if main_process:
                checkpoint_writer.discard_staging(staged)
                if os.path.isdir(staging) and not os.listdir(staging):
                    os.rmdir(staging)
        self.moe_monitor.last_finite_checkpoint = final
        if main_process:
            self._rotate_checkpoints_safely(run_dir)
        self.accelerator.wait_for_everyone()

    def _record_best_under_final_name(self, staging: str, run_dir: str, staged: str) -> None:
        """transformers names the best checkpoint after the folder it was saved in: when the best is the checkpoint
        being staged, that is `.staging/checkpoint-N`, which the rename makes disappear. The state (in memory and in
        the staged trainer_state.json) gets the name the checkpoint will have."""
        best = self.state.best_model_checkpoint
        if not (best and Path(best).parent == Path(staging)):
            return
        self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        state_file = os.path.join(staged, TRAINER_STATE_NAME)
        if self.args.should_save and os.path.isfile(state_file):
            self.state.save_to_json(state_file)

    def _rotate_checkpoints_safely(self, run_dir: str) -> None:
        """transformers' rotation, each old checkpoint renamed away before it is deleted (a kill mid-deletion never
        leaves a half-deleted checkpoint under its name)."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        checkpoints = sort_checkpoints(output_dir=run_dir)
        if len(checkpoints) <= limit:
            return
        protected = {checkpoints[-1]}  # the latest, for resuming, and the best one
        if self.state.best_model_checkpoint is not None:
            protected.add(str(Path(self.state.best_model_checkpoint)))
        remaining = len(checkpoints)
        for old in checkpoints:
            if remaining <= max(limit, len(protected)):
                break
            if old not in protected:
                logger.info("Deleting older checkpoint %s (save_total_limit=%d).", old, limit)
                checkpoint_writer.remove_directory(old)
                remaining -= 1
