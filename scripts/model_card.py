"""Model cards for what the toolkit writes (converted base/chat models, SFT/LoRA outputs, ESFT adapters), from the
templates in `model_cards/`, with Hub metadata (base_model, library_name, license, tags, datasets)."""

import os
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


CARD_KINDS = ("base", "sft", "esft")
EVAL_SECTION_START = "## Evaluation"


def _template(kind: str) -> str:
    if kind not in CARD_KINDS:
        raise ValueError(f"Unknown model card kind {kind!r}; use one of {CARD_KINDS}.")
    return resources.files("deepseekmoe.model_cards").joinpath(f"{kind}.md").read_text(encoding="utf-8")


def architecture_summary(config) -> str:
    moe = len(config.moe_layer_indices)
    return (
        f"{config.num_hidden_layers} layers ({moe} MoE), hidden size {config.hidden_size}, "
        f"{config.n_routed_experts} routed experts (top-{config.num_experts_per_tok}, width "
        f"{config.moe_intermediate_size}) + {config.n_shared_experts or 0} shared, vocabulary {config.vocab_size}."
    )


def write_model_card(
    directory: str | os.PathLike,
    kind: str,
    model_name: str,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    license: str = "other",
    tags: list[str] | None = None,
    **sections: str,
) -> Path:
    """Write `README.md` in `directory` from the `kind` template; `sections` fill the template's fields
    (training, selection, eval_table, architecture, ...)."""
    card_data = ModelCardData(
        base_model=base_model,
        datasets=datasets,
        library_name="transformers",
        license=license,
        tags=["deepseekmoe", "mixture-of-experts", kind, *(tags or [])],
    )
    card = ModelCard.from_template(
        card_data,
        template_str=_template(kind),
        model_name=model_name,
        base_model=base_model,
        model_path=str(directory),
        **sections,
    )
    path = Path(directory) / "README.md"
    card.save(path)
    return path


def set_eval_table(directory: str | os.PathLike, table_markdown: str) -> Path:
    """Replace (or add) the Evaluation section of the card in `directory` with `table_markdown`."""
    path = Path(directory) / "README.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# {Path(directory).name}\n"
    head = text.split(EVAL_SECTION_START)[0].rstrip()
    path.write_text(f"{head}\n\n{EVAL_SECTION_START}\n\n{table_markdown.strip()}\n", encoding="utf-8")
    return path
