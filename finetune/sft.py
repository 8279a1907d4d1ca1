"""Supervised fine-tuning of DeepSeekMoE with TRL's `SFTTrainer`: full, LoRA (attention and/or routed, shared and
dense experts, by name and by layer) and QLoRA (4-bit / 8-bit base with quantized experts).

    from deepseekmoe.finetune.sft import parse_sft_args, run_sft
    result = run_sft(*parse_sft_args(["--model_name_or_path", path, "--dataset_name", "train.jsonl",
                                      "--use_peft", "--output_dir", "out"]))

Flags are named as TRL names them (`SFTConfig` / `TrainingArguments`, and TRL's `ModelConfig` for `--use_peft`,
`--lora_r`, `--lora_target_modules`, `--load_in_4bit`, ...), plus a few DeepSeekMoE ones (`--lora_layers`,
`--train_router`, `--aux_loss_alpha`, `--experts_implementation`). `--config file.yaml` (or .json) supplies any of
them; flags on the command line win. Launch with `accelerate launch` (configs in `finetune/configs/`) for several
processes: the same code runs DDP, FSDP2 and DeepSpeed ZeRO-2/3.
"""

import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import modeling_deepseekmoe  # noqa: F401  (registers the "deepseek" model type; first, to filter bnb's notice)
from modeling_deepseekmoe import checkpoint_writer
from modeling_deepseekmoe.loading import DTYPES, QuantizationArguments, load_pretrained_model
from transformers import AutoTokenizer
from transformers.utils import is_torch_bf16_gpu_available
from trl import SFTConfig, TrlParser

from .data import prepare_sft_dataset
from .run_folder import (
    FINAL_STAGING_DIR, RunPlan, clear_run_outputs, mark_run_finished, plan_run, run_identity, write_run_info,
)
from .trainer import DeepseekMoESFTTrainer


logger = logging.getLogger(__name__)
ROUTER_MODULE = "mlp.gate"


@dataclass
class ModelArguments(QuantizationArguments):
    """The model, its precision and what is trained (names as in TRL's `ModelConfig` where it has them); the
    quantization flags are the project's one set (`modeling_deepseekmoe.loading.QuantizationArguments`)."""

    model_name_or_path: str = field(default=None, metadata={"help": "Local DeepSeekMoE checkpoint directory."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype ('auto' = the checkpoint's).",
            "choices": list(DTYPES),
        },
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    experts_implementation: str | None = field(
        default=None, metadata={"help": "Routed experts kernel: auto, sorted_loop, grouped_mm, batched_mm, eager."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the full model."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (ESFT paper's LoRA baseline: 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling alpha / r = 2, as in the paper)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (also on the routed experts)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": "What gets LoRA: attention, experts (routed), shared_experts, dense_mlp, all (= every one), "
            "all-linear (all but the routed experts), or module-name regexes. The router never does."
        },
    )
    lora_layers: list[int] | None = field(default=None, metadata={"help": "Decoder layers that get LoRA (all)."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling alpha / sqrt(r)."})
    train_router: bool = field(default=False, metadata={"help": "Also train the routers (mlp.gate); frozen if not."})
    aux_loss_alpha: float | None = field(
        default=None,
        metadata={"help": "Weight of DeepSeekMoE's expert-balance loss (0 disables it; default: the config's)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError("A 4-bit / 8-bit base cannot be fine-tuned in full: add --use_peft (QLoRA).")
        if self.aux_loss_alpha is not None and self.aux_loss_alpha < 0:
            raise ValueError(f"--aux_loss_alpha must be >= 0 (got {self.aux_loss_alpha}); 0 disables the aux loss.")


@dataclass
class DataArguments:
    """Where the data is and how it is read (see finetune/data.py)."""

    dataset_name: str = field(
        default=None, metadata={"help": "Training data: a .json/.jsonl/.parquet/.csv file or a save_to_disk folder."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a save_to_disk DatasetDict."})
    dataset_test_split: str = field(default="test", metadata={"help": "Eval split of a save_to_disk DatasetDict."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Evaluation data (same formats)."})
    dataset_format: str = field(
        default="auto",
        metadata={"help": "Row format.", "choices": ["auto", "messages", "prompt_completion", "text"]},
    )
    drop_truncated_rows: bool = field(
        default=False, metadata={"help": "Drop rows whose trained tokens max_length cuts off (an error otherwise)."}
    )


@dataclass
class DeepseekSFTConfig(SFTConfig):
    """TRL's `SFTConfig` with the chat defaults of this project: loss on the assistant answers only."""

    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Train only on the assistant answers (and their EOS) of conversational data."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete an earlier run's checkpoints and final model in output_dir and start over (without it a "
            "folder holding another run, or a finished one, is refused)."
        },
    )

    def __post_init__(self):
        resolve_precision(self)
        # TRL sets the deprecated `gradient_checkpointing` name by default; passing it on under its new name keeps
        # transformers from warning about a flag the user never gave.
        if getattr(self, "activation_checkpointing", False) is None and self.gradient_checkpointing is not None:
            self.activation_checkpointing = self.gradient_checkpointing
        super().__post_init__()


def resolve_precision(args) -> None:
    """TRL turns bf16 on unless fp16 is set. Without a GPU (and without --use_cpu) bf16 left unset means fp32 rather
    than transformers' "doesn't support bf16/gpu" error; on a GPU without bf16 the choice is refused, clearly."""
    if args.fp16 or args.bf16 is False or getattr(args, "use_cpu", False):
        return
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"{torch.cuda.get_device_name()} has no bf16, the precision DeepSeekMoE was trained in. Choose --fp16 "
            "(fp32 master weights with loss scaling; activations may overflow fp16, in which case the run stops at "
            "the first NaN/inf loss, and the in-layer aux loss is then not loss-scaled: its weight is divided by the "
            "loss scale) or --bf16 false for fp32."
        )
    if not is_torch_bf16_gpu_available():
        if args.bf16:
            raise ValueError("--bf16 needs a GPU with bf16; on CPU add --use_cpu true (bf16 autocast on the CPU).")
        logger.warning("No GPU: training in fp32 (--bf16 false). Pass --use_cpu true --bf16 true for bf16 on CPU.")
        args.bf16 = False


SFT_DATACLASSES = (ModelArguments, DataArguments, DeepseekSFTConfig)


class SFTArgumentParser(TrlParser):
    """`HfArgumentParser` over (ModelArguments, DataArguments, DeepseekSFTConfig) that also reads `--config FILE`
    (YAML or JSON mapping of flag names to values; command-line flags take precedence)."""

    def __init__(self, dataclass_types=SFT_DATACLASSES, **kwargs):
        super().__init__(dataclass_types, **kwargs)

    def error(self, message):
        """Argument errors: the error and a one-line usage (the full list of flags is ~150 lines: `--help`)."""
        self.exit(2, f"usage: {self.prog} --model_name_or_path PATH --dataset_name DATA [flags] "
                     f"(`{self.prog} --help` lists them)\n{self.prog}: error: {message}\n")

    def parse_into_dataclasses(self, argv: list[str] | None):
        """The dataclasses, or an argument error for flags none of them has."""
        *parsed, unknown = self.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if "--config" in args:
            index = args.index("--config")
            if index + 1 >= len(args):
                raise ValueError("--config needs a file path.")
            path = args[index + 1]
            del args[index : index + 2]
            unknown = self.set_defaults_with_config(**read_config_file(path))
            if unknown:
                raise ValueError(f"{path} sets unknown option(s): {sorted(set(unknown[::2]))}.")
        return super().parse_known_args(args, namespace)


def read_config_file(path: str | os.PathLike) -> dict:
    import yaml

    with open(path) as handle:
        config = yaml.safe_load(handle)  # JSON is YAML too
    if not isinstance(config, dict):
        raise ValueError(f"The config file {path} must hold a mapping of option names to values.")
    return config


def parse_sft_args(
    argv: list[str] | None = None, prog: str | None = None
) -> tuple[ModelArguments, DataArguments, DeepseekSFTConfig]:
    """(model_args, data_args, training_args) from command-line style arguments (`--config FILE` accepted)."""
    parser = SFTArgumentParser(prog=prog, description="Supervised fine-tuning of DeepSeekMoE (TRL SFTTrainer).")
    model_args, data_args, training_args = parser.parse_into_dataclasses(argv)
    required = {"--model_name_or_path": model_args.model_name_or_path, "--dataset_name": data_args.dataset_name}
    for name, value in required.items():
        if value is None:
            parser.error(f"{name} is required")
    return model_args, data_args, training_args


# --------------------------------------------------------------------------------------------------------------------
# Model


def resolve_dtype(model_args: ModelArguments, training_args) -> torch.dtype | str:
    """The weights dtype. fp16 mixed precision needs fp32 master weights for full fine-tuning and an fp16 compute
    dtype for a (Q)LoRA base."""
    dtype = model_args.dtype
    if training_args.fp16 and dtype in ("auto", "bfloat16"):
        dtype = "float16" if model_args.use_peft else "float32"
        logger.warning("--fp16: loading the weights in %s (they are bf16 in the released checkpoints).", dtype)
    if training_args.fp16 and dtype == "float16" and not model_args.use_peft:
        raise ValueError("Full fine-tuning with --fp16 needs fp32 master weights: use --dtype float32 (or auto).")
    return dtype if dtype == "auto" else getattr(torch, dtype)


def load_model(model_args: ModelArguments, training_args):
    """The model as trained: dtype, quantization, aux-loss weight, frozen routers (full fine-tuning). Loaded by
    the project's one loader: a local base under its absolute path (what the adapter and the card record)."""
    device_map = None
    if model_args.quantization:  # bitsandbytes quantizes on the device the process trains on
        on_gpu = torch.cuda.is_available() and not training_args.use_cpu
        device_map = {"": training_args.local_process_index if on_gpu else "cpu"}
    with _missing_path_named(model_args.model_name_or_path, "--model_name_or_path"):
        model = load_pretrained_model(
            model_args.model_name_or_path, dtype=resolve_dtype(model_args, training_args), quantization=model_args,
            device_map=device_map, attn_implementation=model_args.attn_implementation,
            experts_implementation=model_args.experts_implementation,
        )
    configure_moe_training(model, model_args)
    if model_args.quantization:
        model = prepare_quantized_model(model, training_args)
    elif not model_args.use_peft:
        freeze_routers(model, trainable=model_args.train_router)
    return model


def configure_moe_training(model, model_args: ModelArguments) -> None:
    config = model.config
    if model_args.aux_loss_alpha is not None:
        config.aux_loss_alpha = model_args.aux_loss_alpha
    # TRL's fused LM head would add Mixtral's loss (and fail on the missing num_experts); the model injects its own.
    config.output_router_logits = False


def freeze_routers(model, trainable: bool = False) -> list[str]:
    names = []
    for name, parameter in model.named_parameters():
        if name.endswith(f"{ROUTER_MODULE}.weight"):
            parameter.requires_grad_(trainable)
            names.append(name)
    return names


def prepare_quantized_model(model, training_args):
    gradient_checkpointing_kwargs = training_args.gradient_checkpointing_kwargs or {"use_reentrant": False}
    try:
        from modeling_deepseekmoe.quantization import prepare_for_kbit_training
    except ImportError:  # the quantization module not present: PEFT's helper (upcasts the routers to fp32)
        from peft import prepare_model_for_kbit_training as prepare_for_kbit_training
    return prepare_for_kbit_training(
        model,
        use_gradient_checkpointing=training_args.gradient_checkpointing,
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
    )


def prepare_for_distributed_engine(model) -> None:
    """What the run's distributed engine needs set on the model before it wraps it, whatever config the user brought.

    DeepSpeed ZeRO-3 gathers a module's parameters when that module runs and checks that every rank runs the same
    modules; which experts get tokens differs between ranks, so each MoE block is made a ZeRO-3 leaf module: gathered
    whole on entry (router, shared and routed experts, ESFT's trained and frozen tensors), with no hooks inside.
    ZeRO-3 reduces a leaf's gradients in the leaf's backward hook, which PyTorch fires before the block's own backward
    when the block input does not require grad (everything upstream frozen: ESFT, LoRA on experts only), so that
    input is made to require grad."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoESparseMoeBlock

    blocks = [module for module in model.modules() if isinstance(module, DeepseekMoESparseMoeBlock)]
    if not (is_deepspeed_zero3_enabled() and blocks):
        return
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, [DeepseekMoESparseMoeBlock])
    for block in blocks:
        block.register_forward_pre_hook(_block_input_requires_grad)


def _block_input_requires_grad(module, args):
    hidden_states, *rest = args
    if module.training and torch.is_grad_enabled() and not hidden_states.requires_grad:
        return (hidden_states.detach().requires_grad_(), *rest)
    return None


def build_peft_config(model_args: ModelArguments):
    """The LoRA config of a run: the one place LoRA configs are made (`finetune.lora.build_lora_config`)."""
    from .lora import build_lora_config

    modules_to_save = list(model_args.lora_modules_to_save or [])
    if model_args.train_router and ROUTER_MODULE not in modules_to_save:
        modules_to_save.append(ROUTER_MODULE)
    return build_lora_config(
        model_args.lora_target_modules,
        layers=model_args.lora_layers,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        use_rslora=model_args.use_rslora,
        modules_to_save=modules_to_save or None,
    )


@contextmanager
def _missing_path_named(path: str, flag: str):
    """A model path that does not exist locally is tried as a Hub repo id; when that fails too, say that the path
    does not exist (transformers says "Repo id must be in the form ..." or cannot reach the Hub)."""
    if path is None or os.path.exists(path):
        yield
        return
    try:
        yield
    except OSError as err:
        raise FileNotFoundError(
            f"{flag} {path}: no such local directory (nor a Hub repo that could be loaded); check the path."
        ) from err


def load_tokenizer(model_args: ModelArguments, training_args):
    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    flag = "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path"
    with _missing_path_named(source, flag):
        tokenizer = AutoTokenizer.from_pretrained(source)
    path = training_args.chat_template_path
    if path is not None:
        if not (os.path.isfile(path) and path.endswith((".jinja", ".j2"))):
            raise ValueError(f"--chat_template_path must be a .jinja file here, got {path!r}.")
        with open(path, encoding="utf-8") as handle:
            tokenizer.chat_template = handle.read()
    return tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Data


def prepare_datasets(data_args: DataArguments, training_args, tokenizer, train_dataset=None, eval_dataset=None):
    """Tokenized (train, eval) datasets, validated before any training (errors name the row and field)."""
    from accelerate import PartialState

    options = dict(
        data_format=data_args.dataset_format,
        text_field=training_args.dataset_text_field,
        assistant_only_loss=training_args.assistant_only_loss,
        completion_only_loss=training_args.completion_only_loss,
        max_length=training_args.max_length,
        truncation_mode=training_args.truncation_mode,
        packing=training_args.packing,
        packing_strategy=training_args.packing_strategy,
        drop_truncated_rows=data_args.drop_truncated_rows,
        num_proc=training_args.dataset_num_proc,
    )
    with PartialState().main_process_first():
        train = prepare_sft_dataset(
            train_dataset if train_dataset is not None else data_args.dataset_name,
            tokenizer,
            split=data_args.dataset_train_split,
            **options,
        )
        evaluation = eval_dataset if eval_dataset is not None else data_args.eval_dataset_name
        if evaluation is None and data_args.dataset_name and os.path.isdir(data_args.dataset_name):
            if training_args.eval_strategy != "no" and os.path.isdir(
                os.path.join(data_args.dataset_name, data_args.dataset_test_split)
            ):
                evaluation = data_args.dataset_name
        if evaluation is not None:
            evaluation = prepare_sft_dataset(evaluation, tokenizer, split=data_args.dataset_test_split, **options)
    return train, evaluation


# --------------------------------------------------------------------------------------------------------------------
# Run


@dataclass
class SFTResult:
    trainer: DeepseekMoESFTTrainer | None
    train_output: object
    output_dir: str
    summary: dict | None
    skipped: str | None = None  # why nothing was trained (a finished run resumed), when so


def run_inputs(model_args: ModelArguments, data_args: DataArguments, training_args) -> dict:
    """The inputs of a run, which its output folder may not be (nor, when cleared, delete)."""
    return {
        "model": model_args.model_name_or_path,
        "tokenizer": model_args.tokenizer_name_or_path,
        "training data": data_args.dataset_name,
        "evaluation data": data_args.eval_dataset_name,
        "chat template": training_args.chat_template_path,
    }


def resolve_resume(training_args, identity: dict | None = None, inputs: dict | None = None) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint path, or true / last / auto for the latest in `output_dir`, and only
    when the folder holds this run (`identity`, see `finetune.run_folder`); None to start from scratch. Raises when
    the folder holds another run or `overwrite_output_dir` contradicts the resume, returns None (with a warning)
    when the run there already finished."""
    plan = _plan_output_dir(training_args, identity or {}, inputs)
    if plan.skip:
        logger.warning(plan.skip)
    return plan.checkpoint


def _plan_output_dir(training_args, identity: dict, inputs: dict | None) -> RunPlan:
    return plan_run(
        training_args.output_dir, identity, resume_from_checkpoint=training_args.resume_from_checkpoint,
        overwrite_output_dir=getattr(training_args, "overwrite_output_dir", False), max_steps=training_args.max_steps,
        num_train_epochs=training_args.num_train_epochs, inputs=inputs,
    )


def claim_output_dir(model_args, data_args, training_args, identity: dict):
    """Check that this run may use its output folder (`finetune.run_folder.plan_run`), before anything is loaded;
    clear it when `--overwrite_output_dir` says so and record the run. Returns the `RunPlan`."""
    from accelerate import PartialState

    inputs = run_inputs(model_args, data_args, training_args)
    plan = _plan_output_dir(training_args, identity, inputs)
    state = PartialState()
    state.wait_for_everyone()  # every process has read the folder before the main one changes it
    if plan.skip is None and training_args.should_save:
        if plan.clear:
            removed = clear_run_outputs(training_args.output_dir, inputs)
            logger.warning("--overwrite_output_dir: deleted the earlier run's %s in %s.", ", ".join(removed),
                           training_args.output_dir)
        write_run_info(training_args.output_dir, model_args, data_args, identity)
    state.wait_for_everyone()
    return plan


def run_sft(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DeepseekSFTConfig,
    *,
    train_dataset=None,
    eval_dataset=None,
    callbacks: list | None = None,
    train: bool = True,
    prepare_model=None,
    trainer_class=DeepseekMoESFTTrainer,
    trainer_kwargs: dict | None = None,
) -> SFTResult:
    """Validate the data, load the model, train with `DeepseekMoESFTTrainer` (resuming when asked), save the model
    (or adapter) and tokenizer to `output_dir`. `train_dataset` / `eval_dataset` (`datasets.Dataset`) replace the
    paths of `data_args`. With `train=False` the trainer is built and returned untrained.

    The output folder belongs to one run (`finetune.run_folder`): a folder holding another run, or a finished one, is
    refused before anything loads unless `--resume_from_checkpoint` continues this run or `--overwrite_output_dir`
    starts over; resuming a finished run trains nothing and returns with `skipped` set. The final model is written
    whole (staged in the run folder, validated, moved in)."""
    if train:
        identity = run_identity(model_args, data_args, _method_identity(trainer_class, trainer_kwargs))
        plan = claim_output_dir(model_args, data_args, training_args, identity)
        if plan.skip:
            logger.info(plan.skip)
            return SFTResult(None, None, training_args.output_dir, None, skipped=plan.skip)
    if training_args.fp16 and (model_args.aux_loss_alpha is None or model_args.aux_loss_alpha > 0):
        logger.warning(
            "--fp16: DeepSeekMoE injects its aux-loss gradient inside the MoE layers, outside the fp16 loss scaling, "
            "so its effective weight is aux_loss_alpha / loss_scale."
        )
    tokenizer = load_tokenizer(model_args, training_args)
    train_data, eval_data = prepare_datasets(data_args, training_args, tokenizer, train_dataset, eval_dataset)
    model = load_model(model_args, training_args)
    if prepare_model is not None:  # e.g. ESFT: freeze all but the selected experts
        model = prepare_model(model)
    prepare_for_distributed_engine(model)
    peft_config = build_peft_config(model_args) if model_args.use_peft else None
    trainer = trainer_class(
        model,
        training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        **(trainer_kwargs or {}),
    )
    if not train:
        return SFTResult(trainer, None, training_args.output_dir, None)
    output = trainer.train(resume_from_checkpoint=plan.checkpoint)
    save_final_model(trainer, training_args.output_dir)
    if trainer.args.should_save:
        trainer.write_model_card(model_args, data_args)
        mark_run_finished(training_args.output_dir, trainer.state.global_step, training_args.max_steps,
                          training_args.num_train_epochs)
    trainer.accelerator.wait_for_everyone()
    return SFTResult(trainer, output, training_args.output_dir, trainer.moe_monitor.summary)


def _method_identity(trainer_class, trainer_kwargs: dict | None) -> dict:
    """What the trainer adds to a run's identity: its class and its JSON-serialisable settings (ESFT's experts)."""
    method = {"trainer": trainer_class.__name__}
    for key, value in (trainer_kwargs or {}).items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        method[key] = value
    return method


def save_final_model(trainer, output_dir: str | os.PathLike) -> None:
    """`trainer.save_model` through the checkpoint writer: staged in the run folder (every process takes part, as
    sharded engines gather the weights), validated (the released layout for a full model, readable weights for an
    adapter), then moved in beside the checkpoints, the file that marks it complete last. A full disk raises
    `DiskFullError` and leaves no final model that looks complete."""
    output_dir = Path(output_dir)
    staging = output_dir / FINAL_STAGING_DIR
    main_process = trainer.args.should_save
    if main_process:
        checkpoint_writer.prepare_staging(output_dir, staging)
    trainer.accelerator.wait_for_everyone()
    config = getattr(trainer.accelerator.unwrap_model(trainer.model), "config", None)
    try:
        with checkpoint_writer.reporting_disk_full(output_dir, staging if main_process else None):
            trainer.save_model(str(staging))
            trainer.accelerator.wait_for_everyone()
            if main_process:
                checkpoint_writer.commit_staging(
                    staging, output_dir, into=True,
                    validate=lambda staged: checkpoint_writer.validate_saved_model(staged, config),
                )
    finally:
        if main_process:
            checkpoint_writer.discard_staging(staging)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_sft(*parse_sft_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
