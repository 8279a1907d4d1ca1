"""ESFT training: the SFT pipeline (same data formats, chat template, trainer, resume and multi-GPU configs) with
everything frozen but the selected experts; the final output and the weights of each checkpoint are ESFT adapters
(under DeepSpeed a checkpoint also holds the engine's own files, which resume reads).

    accelerate launch --config_file finetune/configs/fsdp2.yaml -m deepseekmoe.finetune.esft.train --expert_config ...
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.trainer import SCHEDULER_NAME

from ..sft import DataArguments, DeepseekSFTConfig, ModelArguments, SFTArgumentParser, run_sft
from ..trainer import DeepseekMoESFTTrainer
from .adapter import adapter_tensors, apply_esft_adapter, save_esft_adapter, validate_expert_config
from .experts import prepare_esft_model


@dataclass
class ESFTArguments:
    expert_config: str = field(
        default=None,
        metadata={"help": 'ESFT expert config JSON ({"experts": {"<layer>": [ids]}, ...}), from `esft select`.'},
    )
    train_shared_experts: bool | None = field(
        default=None, metadata={"help": "Override the config's shared_experts (train the shared experts too)."}
    )
    train_non_expert_modules: bool | None = field(
        default=None, metadata={"help": "Override the config's non_expert_modules (attention, norms, embeddings)."}
    )


def load_expert_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No expert config at {path}; make one with `deepseekmoe esft select`.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


class ESFTTrainer(DeepseekMoESFTTrainer):
    """Saves (and resumes from) ESFT adapters instead of full models."""

    def __init__(self, model, args=None, *, expert_config: dict, **kwargs):
        self.expert_config = expert_config
        super().__init__(model, args, **kwargs)

    def tensors_to_save(self, model):
        """What the ESFT adapter holds: the trained tensors (selected experts; shared experts and non-expert modules
        when the config trains them), not the frozen base."""
        return ((name, p) for name, p in model.named_parameters() if p.requires_grad)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The ESFT adapter, on any engine: every rank joins in gathering the trained tensors (ZeRO-3 partitions,
        FSDP2 shards; only those, never the frozen base), the main process alone writes them."""
        output_dir = output_dir or self.args.output_dir
        if not _internal_call:  # a checkpoint's weights were checked before its save began
            self.refuse_non_finite_weights(output_dir)
        model = self.accelerator.unwrap_model(self.model)
        tensors = adapter_tensors(model, self.expert_config)
        if self.args.should_save:
            save_esft_adapter(model, self.expert_config, output_dir, base_model_name_or_path=model.config.name_or_path,
                              tensors=tensors)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # The weights are the adapter save_model wrote; the Trainer would add the whole model (frozen base included).
        from accelerate.utils import save_fsdp_optimizer

        plugin = self.accelerator.state.fsdp_plugin
        save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Single process / DDP: before the model is wrapped; FSDP2: after, into the shards (DeepSpeed resumes from
        # its own checkpoint instead).
        apply_esft_adapter(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:  # the engine's own checkpoint
            return super()._load_best_model()
        apply_esft_adapter(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    def write_model_card(self, model_args, data_args) -> None:
        from deepseekmoe.model_cards.card import write_training_card

        setup = self.training_setup(model_args, data_args, expert_config=self.expert_config)
        write_training_card(self.args.output_dir, setup)


def run_esft(model_args: ModelArguments, data_args: DataArguments, training_args: DeepseekSFTConfig,
             esft_args: ESFTArguments, **run_kwargs):
    """Train the experts `esft_args.expert_config` selects; the output directory holds the ESFT adapter. The aux loss
    is off unless `--aux_loss_alpha` is given (the routers are frozen in ESFT)."""
    if model_args.use_peft:
        raise ValueError("ESFT trains selected experts directly; drop --use_peft.")
    if model_args.quantization:
        raise ValueError("ESFT trains expert weights in full precision; load the base without 4/8-bit.")
    expert_config = dict(load_expert_config(esft_args.expert_config))
    if esft_args.train_shared_experts is not None:
        expert_config["shared_experts"] = esft_args.train_shared_experts
    if esft_args.train_non_expert_modules is not None:
        expert_config["non_expert_modules"] = esft_args.train_non_expert_modules
    if model_args.aux_loss_alpha is None:
        model_args.aux_loss_alpha = 0.0

    def prepare(model):
        validate_expert_config(expert_config, model.config)
        return prepare_esft_model(model, expert_config)

    return run_sft(
        model_args, data_args, training_args, prepare_model=prepare, trainer_class=ESFTTrainer,
        trainer_kwargs={"expert_config": expert_config}, **run_kwargs,
    )  # fmt: skip


def parse_esft_args(argv: list[str] | None = None, prog: str | None = None):
    """(model_args, data_args, training_args, esft_args): the SFT flags plus --expert_config (`--config FILE` too)."""
    parser = SFTArgumentParser((ModelArguments, DataArguments, DeepseekSFTConfig, ESFTArguments), prog=prog,
                               description="Expert-Specialized Fine-Tuning of DeepSeekMoE.")
    parsed = parser.parse_into_dataclasses(argv)
    model_args, data_args, _, esft_args = parsed
    required = {"--model_name_or_path": model_args.model_name_or_path, "--dataset_name": data_args.dataset_name,
                "--expert_config": esft_args.expert_config}
    for name, value in required.items():
        if value is None:
            parser.error(f"{name} is required")
    return parsed


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_esft(*parse_esft_args(argv, prog="deepseekmoe esft train"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
