"""Moved to `deepseekmoe.eval.inference` (generation) and `modeling_deepseekmoe.loading` (dtype names); this name
stays until finetune/esft/cli.py, finetune/esft/merge.py and scripts/convert.py import from there."""

from deepseekmoe.eval.inference import (  # noqa: F401
    chat_input_ids,
    chat_loop,
    generate_reply,
    generate_text,
    load_for_inference,
    load_messages,
)
from deepseekmoe.finetune.adapters import adapter_kind  # noqa: F401
from modeling_deepseekmoe.loading import DTYPES  # noqa: F401
