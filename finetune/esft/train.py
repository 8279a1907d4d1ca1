"""ESFT training: the SFT pipeline (same data formats, chat template, trainer, resume and multi-GPU configs) with
everything frozen but the selected experts; checkpoints and the final output are ESFT adapters (frozen weights are
never written)."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..sft import DataArguments, DeepseekSFTConfig, ModelArguments, SFTArgumentParser, run_sft
from ..trainer import DeepseekMoESFTTrainer
from .adapter import apply_esft_adapter, save_esft_adapter, validate_expert_config
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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        save_esft_adapter(model, self.expert_config, output_dir, base_model_name_or_path=model.config.name_or_path)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        apply_esft_adapter(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def write_model_card(self, model_args, data_args) -> None:
        from deepseekmoe.model_card import write_model_card

        output_dir = Path(self.args.output_dir)
        selection = "\n".join(f"- layer {layer}: experts {ids}" for layer, ids in self.expert_config["experts"].items())
        selection += (f"\n- shared experts trained: {self.expert_config.get('shared_experts', False)}"
                      f"\n- non-expert modules trained: {self.expert_config.get('non_expert_modules', False)}")
        size = (output_dir / "adapter_model.safetensors").stat().st_size
        write_model_card(
            output_dir,
            "esft",
            model_name=output_dir.name,
            base_model=model_args.model_name_or_path,
            selection=selection,
            training=self.training_summary(model_args, data_args),
            adapter_size=f"{size / 1e6:.2f} MB",
        )


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
    parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args, _, esft_args = parsed
    required = {"--model_name_or_path": model_args.model_name_or_path, "--dataset_name": data_args.dataset_name,
                "--expert_config": esft_args.expert_config}
    for name, value in required.items():
        if value is None:
            parser.error(f"{name} is required")
    return parsed
