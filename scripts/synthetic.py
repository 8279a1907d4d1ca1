"""Moved to `deepseekmoe.finetune.synthetic`; this name stays until tests/test_demo.py and benchmarks/esft_vs_lora.py
import from there."""

from deepseekmoe.finetune.synthetic import (  # noqa: F401
    DOMAINS,
    domain_losses,
    encode_batches,
    make_corpus,
    pretrain,
    task_conversations,
    tiny_moe_config,
)
