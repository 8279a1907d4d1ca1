"""Model cards for what the toolkit writes, one kind per kind of output:

- `base`: a checkpoint as converted, downloaded or pre-trained (`write_base_card`);
- `sft`: a full fine-tune; `lora`: a LoRA / QLoRA adapter; `esft`: an ESFT adapter (`write_training_card`);
- `merged`: base + LoRA adapter; `esft_merged`: base + ESFT adapter (`write_merged_card`).

A trained kind says how it was made (`TrainingSetup`: method, LoRA rank/alpha/targets or the ESFT experts per layer,
data, steps, learning rate, precision, quantization, base model as an absolute path or hub id) in its text and, for
tools, under `training_setup` in the card's metadata (`read_training_setup`), which a merge copies into the merged
card. Every card has a loading snippet that loads the model the way it was trained (a QLoRA adapter on the 4-bit
base) and an Evaluation section that `deepseekmoe eval --model_card` fills (`set_eval_table`). Templates: the
`<kind>.md` files of this package.
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from modeling_deepseekmoe.loading import QuantizationArguments, model_reference, quantization_record


KINDS = ("base", "sft", "lora", "esft", "merged", "esft_merged")
FULL_FINE_TUNING, LORA, QLORA, ESFT = "full fine-tuning", "LoRA", "QLoRA", "ESFT"
EVAL_SECTION_START = "## Evaluation"
SETUP_KEY = "training_setup"
CARD_FILE = "README.md"
_KIND_TAGS = {
    "base": [],
    "sft": ["sft", "full-fine-tuning"],
    "lora": ["sft", "lora", "peft"],
    "esft": ["esft", "expert-specialized-fine-tuning"],
    "merged": ["sft", "lora", "merged"],
    "esft_merged": ["esft", "expert-specialized-fine-tuning", "merged"],
}


@dataclass
class TrainingSetup:
    """How a model was trained, as a card records it."""

    method: str  # FULL_FINE_TUNING, LORA, QLORA or ESFT
    base_model: str  # absolute path or hub id
    datasets: list[str] = field(default_factory=list)
    dataset_format: str | None = None
    steps: int | None = None
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    per_device_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    processes: int | None = None
    max_length: int | None = None
    precision: str | None = None  # "bf16", "fp16" (mixed precision) or "fp32"
    dtype: str | None = None  # the weights' dtype name ("auto": the checkpoint's)
    quantization: dict | None = None  # `QuantizationArguments` flags, compute dtype resolved
    lora: dict | None = None  # r, lora_alpha, lora_dropout, target_modules, layers, use_rslora, modules_to_save
    esft: dict | None = None  # the expert config: {"experts": {"<layer>": [ids]}, "shared_experts", ...}
    aux_loss_alpha: float | None = None
    train_router: bool = False
    seed: int | None = None
    merged_from: str | None = None  # for a merged model: the adapter directory
    summary: dict | None = None  # the run summary (tokens/s, peak memory, ...)

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingSetup":
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    @property
    def is_adapter(self) -> bool:
        return self.method in (LORA, QLORA, ESFT)


def training_setup(model_args, data_args, training_args, *, steps: int | None = None,
                   expert_config: dict | None = None, aux_loss_alpha: float | None = None,
                   summary: dict | None = None) -> TrainingSetup:  # fmt: skip
    """The setup of an SFT / ESFT run from its (model, data, training) arguments (`finetune.sft`'s dataclasses, or
    anything with the same attribute names): `steps` (the steps trained), `expert_config` (ESFT),
    `aux_loss_alpha` (the value the model used) and `summary` (the run summary) complete it."""
    values = vars(model_args)
    quantization = QuantizationArguments.from_dict(values)
    method = ESFT if expert_config else QLORA if values.get("use_peft") and quantization.quantization else (
        LORA if values.get("use_peft") else FULL_FINE_TUNING)  # fmt: skip
    lora = None
    if values.get("use_peft"):
        lora = {
            "r": values.get("lora_r"), "lora_alpha": values.get("lora_alpha"),
            "lora_dropout": values.get("lora_dropout"),
            "target_modules": list(values.get("lora_target_modules") or []),
            "layers": values.get("lora_layers"), "use_rslora": values.get("use_rslora", False),
            "modules_to_save": values.get("lora_modules_to_save"),
        }  # fmt: skip
    dataset = getattr(data_args, "dataset_name", None)
    alpha = aux_loss_alpha if aux_loss_alpha is not None else values.get("aux_loss_alpha")
    return TrainingSetup(
        method=method,
        base_model=_reference(values.get("model_name_or_path")),
        datasets=[_reference(dataset)] if dataset else [],
        dataset_format=getattr(data_args, "dataset_format", None),
        steps=steps if steps is not None else _positive(getattr(training_args, "max_steps", None)),
        learning_rate=getattr(training_args, "learning_rate", None),
        lr_scheduler=_name(getattr(training_args, "lr_scheduler_type", None)),
        per_device_batch_size=getattr(training_args, "per_device_train_batch_size", None),
        gradient_accumulation_steps=getattr(training_args, "gradient_accumulation_steps", None),
        processes=getattr(training_args, "world_size", None),
        max_length=getattr(training_args, "max_length", None),
        precision="bf16" if getattr(training_args, "bf16", False) else "fp16" if getattr(training_args, "fp16", False)
        else "fp32",
        dtype=values.get("dtype"),
        quantization=quantization_record(quantization, values.get("dtype") or "auto"),
        lora=lora,
        esft=_normalised_expert_config(expert_config) if expert_config else None,
        aux_loss_alpha=alpha,
        train_router=bool(values.get("train_router", False)),
        seed=getattr(training_args, "seed", None),
        summary=summary,
    )


def _reference(name_or_path) -> str | None:
    if name_or_path is None:
        return None
    try:
        return model_reference(name_or_path)
    except FileNotFoundError:
        return os.fspath(name_or_path)


def _positive(value):
    return value if isinstance(value, int) and value > 0 else None


def _name(value):
    return getattr(value, "value", value)


def _normalised_expert_config(expert_config: dict) -> dict:
    return {
        "experts": {str(layer): sorted(int(e) for e in ids) for layer, ids in expert_config["experts"].items()},
        "shared_experts": bool(expert_config.get("shared_experts", False)),
        "non_expert_modules": bool(expert_config.get("non_expert_modules", False)),
    }


# --------------------------------------------------------------------------------------------------------------------
# Sections


def architecture_summary(config) -> str:
    moe = len(config.moe_layer_indices)
    return (
        f"{config.num_hidden_layers} layers ({moe} MoE), hidden size {config.hidden_size}, "
        f"{config.n_routed_experts} routed experts (top-{config.num_experts_per_tok}, width "
        f"{config.moe_intermediate_size}) + {config.n_shared_experts or 0} shared, vocabulary {config.vocab_size}."
    )


def _is_hub_id(reference: str) -> bool:
    return not os.path.isabs(reference) and not Path(reference).exists()


def model_link(reference: str) -> str:
    """A hub id as a link to its Hub page, a local path as code."""
    return f"[{reference}](https://huggingface.co/{reference})" if _is_hub_id(reference) else f"`{reference}`"


def describe_quantization(quantization: dict | None) -> str:
    if not quantization:
        return "none"
    if quantization.get("load_in_8bit"):
        return "8-bit (LLM.int8, bitsandbytes)"
    nested = ", double quantization" if quantization.get("use_bnb_nested_quant") else ""
    return (f"4-bit {quantization.get('bnb_4bit_quant_type', 'nf4')}{nested}, "
            f"{quantization.get('bnb_4bit_compute_dtype')} compute (bitsandbytes)")  # fmt: skip


def describe_lora(lora: dict) -> str:
    layers = "all layers" if not lora.get("layers") else f"layers {lora['layers']}"
    targets = ", ".join(map(str, lora.get("target_modules") or [])) or "?"
    scaling = "alpha / sqrt(r) (rsLoRA)" if lora.get("use_rslora") else "alpha / r"
    return (f"rank {lora.get('r')}, alpha {lora.get('lora_alpha')} (scaling {scaling}), dropout "
            f"{lora.get('lora_dropout')}, targets {targets} ({layers})")  # fmt: skip


def training_table(setup: TrainingSetup) -> str:
    rows = [("method", setup.method), ("base model", model_link(setup.base_model))]
    if setup.merged_from:
        rows.append(("adapter merged", f"`{setup.merged_from}`"))
    if setup.lora:
        lora = setup.lora
        rows += [("LoRA rank (r)", lora.get("r")), ("LoRA alpha", lora.get("lora_alpha")),
                 ("LoRA dropout", lora.get("lora_dropout")),
                 ("LoRA targets", ", ".join(map(str, lora.get("target_modules") or []))),
                 ("LoRA layers", "all" if not lora.get("layers") else ", ".join(map(str, lora["layers"]))),
                 ("rsLoRA", "yes" if lora.get("use_rslora") else "no")]  # fmt: skip
        if lora.get("modules_to_save"):
            rows.append(("trained in full", ", ".join(lora["modules_to_save"])))
    if setup.esft:
        selected = sum(len(ids) for ids in setup.esft["experts"].values())
        rows.append(("ESFT experts trained", f"{selected} in {len(setup.esft['experts'])} MoE layers (see Expert "
                                             "selection)"))  # fmt: skip
    data = ", ".join(f"`{name}`" for name in setup.datasets) or "?"
    rows += [
        ("data", data + (f" ({setup.dataset_format} format)" if setup.dataset_format else "")),
        ("steps", setup.steps),
        ("learning rate", f"{setup.learning_rate}" + (f" ({setup.lr_scheduler})" if setup.lr_scheduler else "")),
        ("batch", f"{setup.per_device_batch_size} per device x {setup.gradient_accumulation_steps} accumulation x "
                  f"{setup.processes} process(es)"),
        ("max length", setup.max_length),
        ("precision", f"{setup.precision}, weights {setup.dtype}"),
        ("base quantization", describe_quantization(setup.quantization)),
        ("aux loss alpha", setup.aux_loss_alpha),
        ("routers", "trained" if setup.train_router else "frozen"),
        ("seed", setup.seed),
    ]  # fmt: skip
    lines = ["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows if value is not None]
    if setup.summary:
        lines += ["", f"Run summary: `{json.dumps(setup.summary)}`"]
    return "\n".join(lines)


def selection_table(expert_config: dict, num_experts: int | None = None) -> str:
    of = f" of {num_experts}" if num_experts else ""
    lines = ["| MoE layer | experts trained |", "|---|---|"]
    lines += [f"| {layer} | {len(ids)}{of}: {', '.join(map(str, ids)) or '-'} |"
              for layer, ids in expert_config["experts"].items()]  # fmt: skip
    lines += ["", f"Shared experts trained: {'yes' if expert_config.get('shared_experts') else 'no'}; non-expert "
                  f"modules (attention, norms, embeddings) trained: "
                  f"{'yes' if expert_config.get('non_expert_modules') else 'no'}."]  # fmt: skip
    return "\n".join(lines)


def _python(lines: list[str]) -> str:
    return "```python\n" + "\n".join(lines) + "\n```"


def _bash(lines: list[str]) -> str:
    return "```bash\n" + "\n".join(lines) + "\n```"


def checkpoint_snippet(location: str) -> str:
    return _python([
        'import modeling_deepseekmoe  # registers the "deepseek" model type',
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{location}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
    ]) + "\n\n" + _bash([f"deepseekmoe chat {location}"])  # fmt: skip


def _quantization_arguments(quantization: dict | None) -> tuple[list[str], list[str]]:
    """(Python keyword arguments, CLI flags) that load the base quantized as it was trained."""
    if not quantization:
        return [], []
    if quantization.get("load_in_8bit"):
        return ["load_in_8bit=True"], ["--load_in_8bit"]
    python = ["load_in_4bit=True", f'bnb_4bit_quant_type="{quantization.get("bnb_4bit_quant_type", "nf4")}"',
              f"use_bnb_nested_quant={bool(quantization.get('use_bnb_nested_quant'))}",
              f'bnb_4bit_compute_dtype="{quantization.get("bnb_4bit_compute_dtype")}"']  # fmt: skip
    flags = ["--load_in_4bit", f"--bnb_4bit_quant_type {quantization.get('bnb_4bit_quant_type', 'nf4')}",
             f"--use_bnb_nested_quant {str(bool(quantization.get('use_bnb_nested_quant'))).lower()}",
             f"--bnb_4bit_compute_dtype {quantization.get('bnb_4bit_compute_dtype')}"]  # fmt: skip
    return python, flags


def adapter_snippet(setup: TrainingSetup, location: str) -> str:
    python, flags = _quantization_arguments(setup.quantization if setup.method == QLORA else None)
    dtype = [f'dtype="{setup.dtype}"'] if setup.dtype and setup.dtype != "auto" else []
    arguments = ", ".join([f'"{setup.base_model}"', f'adapter="{location}"', *dtype, *python])
    merge = (f"deepseekmoe esft merge --model_name_or_path {setup.base_model} --adapter_name_or_path {location} "
             "--output_dir merged" if setup.method == ESFT else
             f"deepseekmoe merge --model_name_or_path {setup.base_model} --adapter_name_or_path {location} "
             "--output_dir merged")  # fmt: skip
    code = _python([
        "from deepseekmoe.finetune.adapters import load_model, load_tokenizer",
        "",
        f"model = load_model({arguments})",
        f'tokenizer = load_tokenizer("{setup.base_model}", adapter="{location}")',
    ])  # fmt: skip
    return code + "\n\n" + _bash([" ".join([f"deepseekmoe chat {setup.base_model} --adapter {location}", *flags]),
                                  merge])  # fmt: skip


def compatibility_note(directory: Path) -> str:
    """What else reads the checkpoint in `directory`, judged from its config.json and files."""
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    auto_map = config.get("auto_map") or {}
    remote_files = sorted({f"{str(target).split('.')[0]}.py" for target in auto_map.values()})
    if auto_map and all((directory / name).is_file() for name in remote_files):
        reference = ("The reference remote code loads it too (`trust_remote_code=True`): config.json keeps the "
                     f"released `auto_map` and its modeling files ({', '.join(remote_files)}) are here.")  # fmt: skip
    elif auto_map:
        reference = (f"config.json keeps the released `auto_map`, but its modeling files ({', '.join(remote_files)}) "
                     "are not in this directory: copy them from the released repository to load it with the "
                     "reference remote code (`trust_remote_code=True`).")  # fmt: skip
    else:
        reference = ("config.json has no `auto_map`: the reference remote code cannot load this directory as it is; "
                     "load it with `modeling_deepseekmoe` as above.")  # fmt: skip
    if "DeepseekForCausalLM" in (config.get("architectures") or []):
        reference += (" config.json names the released architecture `DeepseekForCausalLM` over the released tensor "
                      "names, the layout vLLM's and SGLang's DeepSeek (v1) models read (not run here).")  # fmt: skip
    return reference


# --------------------------------------------------------------------------------------------------------------------
# Writing


def _template(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"Unknown model card kind {kind!r}; use one of {KINDS}.")
    return resources.files("deepseekmoe.model_cards").joinpath(f"{kind}.md").read_text(encoding="utf-8")


def _config_of(directory: Path):
    if not (directory / "config.json").is_file():
        return None
    from modeling_deepseekmoe import DeepseekMoEConfig

    return DeepseekMoEConfig.from_pretrained(directory)


def _write(directory, kind: str, *, model_name: str | None, location: str | None, setup: TrainingSetup | None,
           config=None, **fields_) -> Path:  # fmt: skip
    directory = Path(directory)
    location = location or os.path.abspath(directory)
    config = config if config is not None else _config_of(directory)
    tags = ["deepseekmoe", "mixture-of-experts", *_KIND_TAGS[kind]]
    if setup is not None and setup.method == QLORA:
        tags.append("qlora")
    metadata = {"base_model_relation": "adapter" if kind in ("lora", "esft") else "finetune"} if setup else {}
    if setup is not None:
        metadata[SETUP_KEY] = setup.to_dict()
    hub_datasets = [name for name in (setup.datasets if setup else []) if _is_hub_id(name)]
    card_data = ModelCardData(
        base_model=setup.base_model if setup else None,
        datasets=hub_datasets or None,
        library_name="peft" if kind == "lora" else "transformers",
        license=fields_.pop("license", None) or "other",
        tags=tags,
        **metadata,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=_template(kind),
        model_name=model_name or Path(location).name,
        location=location,
        setup=setup,
        base_model=model_link(setup.base_model) if setup else None,
        training=training_table(setup) if setup else None,
        architecture=architecture_summary(config) if config is not None else None,
        **fields_,
    )
    path = directory / CARD_FILE
    card.save(path)
    return path


def write_base_card(directory, config=None, *, model_name: str | None = None, origin: str | None = None,
                    location: str | None = None, eval_table: str | None = None) -> Path:  # fmt: skip
    """The card of a checkpoint that was not trained here (converted, downloaded, pre-trained): loading, what else
    reads it (from its config.json and files), architecture, evaluation. `location`: where it will live (default:
    `directory`, absolute)."""
    directory = Path(directory)
    location = location or os.path.abspath(directory)
    return _write(directory, "base", model_name=model_name, location=location, setup=None, config=config,
                  origin=origin, loading=checkpoint_snippet(location), compatibility=compatibility_note(directory),
                  eval_table=eval_table)  # fmt: skip


def write_training_card(directory, setup: TrainingSetup, *, model_name: str | None = None,
                        location: str | None = None, notes: str | None = None) -> Path:  # fmt: skip
    """The card of an SFT output (full checkpoint), a LoRA / QLoRA adapter or an ESFT adapter, by `setup.method`."""
    directory = Path(directory)
    location = location or os.path.abspath(directory)
    kind = {FULL_FINE_TUNING: "sft", LORA: "lora", QLORA: "lora", ESFT: "esft"}.get(setup.method)
    if kind is None:
        raise ValueError(f"Unknown training method {setup.method!r}; use one of {FULL_FINE_TUNING!r}, {LORA!r}, "
                         f"{QLORA!r}, {ESFT!r}.")  # fmt: skip
    extra = {}
    if kind == "esft":
        extra = {"selection": selection_table(setup.esft), "adapter_size": _file_size(directory)}
    loading = checkpoint_snippet(location) if kind == "sft" else adapter_snippet(setup, location)
    config = _config_of(directory) if kind == "sft" else _base_config(setup.base_model)
    return _write(directory, kind, model_name=model_name, location=location, setup=setup, config=config,
                  loading=loading, lora=describe_lora(setup.lora) if setup.lora else None,
                  quantization=describe_quantization(setup.quantization), notes=notes, **extra)  # fmt: skip


def _file_size(directory: Path) -> str | None:
    weights = directory / "adapter_model.safetensors"
    return f"{weights.stat().st_size / 1e6:.2f} MB" if weights.is_file() else None


def _base_config(base_model: str):
    path = Path(base_model)
    return _config_of(path) if path.is_dir() else None


def write_merged_card(directory, adapter_dir, config=None, *, model_name: str | None = None,
                      location: str | None = None, dequantized: bool | None = None) -> Path:  # fmt: skip
    """The card of base + adapter merged: the adapter's training setup (from its card, else reconstructed from its
    files), the adapter merged, loading as a plain checkpoint. `dequantized`: whether a QLoRA adapter was merged into
    the dequantized quantized base (merge's default) rather than the full-precision one (default: as for QLoRA)."""
    from deepseekmoe.finetune.adapters import ESFT as ESFT_KIND, adapter_kind

    directory, adapter_dir = Path(directory), Path(adapter_dir)
    location = location or os.path.abspath(directory)
    setup = read_training_setup(adapter_dir) or setup_from_adapter_files(adapter_dir)
    setup.merged_from = os.path.abspath(adapter_dir)
    kind = "esft_merged" if adapter_kind(adapter_dir) == ESFT_KIND else "merged"
    extra = {"selection": selection_table(setup.esft)} if kind == "esft_merged" and setup.esft else {}
    dequantized = setup.method == QLORA if dequantized is None else dequantized
    return _write(directory, kind, model_name=model_name, location=location, setup=setup, config=config,
                  loading=checkpoint_snippet(location), adapter=f"`{setup.merged_from}`", dequantized=dequantized,
                  quantization=describe_quantization(setup.quantization), **extra)  # fmt: skip


def read_training_setup(directory) -> TrainingSetup | None:
    """The `TrainingSetup` recorded in the card of `directory` (None without one)."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        return None
    values = ModelCard.load(path).data.to_dict().get(SETUP_KEY)
    return TrainingSetup.from_dict(values) if isinstance(values, dict) else None


def setup_from_adapter_files(adapter_dir) -> TrainingSetup:
    """As much of an adapter's setup as its files tell, for an adapter without a card that records it: PEFT's
    `adapter_config.json` and the run's `sft_run.json` (LoRA), `expert_config.json` / `esft_adapter.json` (ESFT)."""
    adapter_dir = Path(adapter_dir)
    run_file = adapter_dir / "sft_run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    model_args, data_args = run.get("model_args", {}), run.get("data_args", {})
    if (adapter_dir / "esft_adapter.json").is_file():
        metadata = json.loads((adapter_dir / "esft_adapter.json").read_text())
        expert_config = json.loads((adapter_dir / "expert_config.json").read_text())
        base = metadata.get("base_model_name_or_path") or model_args.get("model_name_or_path") or "?"
        method, esft, lora = ESFT, _normalised_expert_config(expert_config), None
    else:
        peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
        base = peft_config.get("base_model_name_or_path") or model_args.get("model_name_or_path") or "?"
        quantized = run.get("quantization") not in (None, "none")
        method, esft = (QLORA if quantized else LORA), None
        lora = {"r": peft_config.get("r"), "lora_alpha": peft_config.get("lora_alpha"),
                "lora_dropout": peft_config.get("lora_dropout"),
                "target_modules": model_args.get("lora_target_modules") or [str(peft_config.get("target_modules"))],
                "layers": model_args.get("lora_layers"), "use_rslora": peft_config.get("use_rslora", False),
                "modules_to_save": peft_config.get("modules_to_save")}  # fmt: skip
    dataset = data_args.get("dataset_name")
    quantization = QuantizationArguments.from_dict(model_args)
    return TrainingSetup(method=method, base_model=_reference(base), datasets=[_reference(dataset)] if dataset else [],
                         dataset_format=data_args.get("dataset_format"), dtype=model_args.get("dtype"),
                         quantization=quantization_record(quantization, model_args.get("dtype") or "auto"),
                         lora=lora, esft=esft, aux_loss_alpha=model_args.get("aux_loss_alpha"),
                         train_router=bool(model_args.get("train_router", False)))  # fmt: skip


def set_eval_table(directory: str | os.PathLike, table_markdown: str) -> Path:
    """Replace (or add) the Evaluation section of the card in `directory` with `table_markdown`."""
    path = Path(directory) / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# {Path(directory).name}\n"
    head = text.split(EVAL_SECTION_START)[0].rstrip()
    path.write_text(f"{head}\n\n{EVAL_SECTION_START}\n\n{table_markdown.strip()}\n", encoding="utf-8")
    return path
