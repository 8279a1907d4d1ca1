"""Moved to `deepseekmoe.model_cards.card`. This name, and the old `write_model_card(directory, kind, ...)` call, stay
until finetune/trainer.py, finetune/merge.py, finetune/esft/train.py and finetune/esft/merge.py make the new calls."""

from pathlib import Path

from deepseekmoe.model_cards.card import (  # noqa: F401
    ESFT,
    FULL_FINE_TUNING,
    LORA,
    TrainingSetup,
    _write,
    architecture_summary,
    checkpoint_snippet,
    set_eval_table,
    write_base_card,
)


def write_model_card(directory, kind: str, model_name: str, base_model: str | None = None, datasets=None,
                     license: str = "other", tags=None, **sections) -> Path:  # fmt: skip
    """The old call: a card with what it was given (method and free-text training notes), no recorded setup."""
    if kind == "base":
        return write_base_card(directory, model_name=model_name, origin=sections.get("origin"))
    method = ESFT if kind == "esft" else LORA if sections.get("adapter") else FULL_FINE_TUNING
    setup = TrainingSetup(method=method, base_model=str(base_model))
    notes = "\n\n".join(str(sections[key]) for key in ("method", "training") if sections.get(key))
    card_kind = "esft" if kind == "esft" else "lora" if sections.get("adapter") else "sft"
    return _write(directory, card_kind, model_name=model_name, location=None, setup=setup, notes=notes,
                  loading=checkpoint_snippet(str(Path(directory).absolute())), lora="settings not recorded",
                  selection=sections.get("selection", ""), quantization="none")  # fmt: skip
