import pytest
import torch

import modeling_deepseekmoe  # noqa: F401  (registers the model type)
from modeling_deepseekmoe import DeepseekMoEConfig
from modeling_deepseekmoe.checkpoint import write_random_released_checkpoint
from modeling_deepseekmoe.tokenization import build_tokenizer


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine waiting threads slow them
    down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> DeepseekMoEConfig:
    """A 3-layer DeepSeekMoE with the released structure: layer 0 dense, then MoE layers with shared experts."""
    values = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    values.update(overrides)
    return DeepseekMoEConfig(**values)


def write_tiny_checkpoint(directory, *, max_position_embeddings: int = 128, max_shard_bytes: int = 60_000):
    """A tiny checkpoint in the released layout (per-expert keys, shards of at most `max_shard_bytes`, auto_map) with
    a tiny tokenizer and the DeepSeek chat template, in `directory`: what a user downloads, at toy size."""
    tokenizer = build_tokenizer(512, save_directory=directory)
    config = tiny_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, max_position_embeddings=max_position_embeddings)
    return write_random_released_checkpoint(config, directory, dtype=torch.float32, max_shard_bytes=max_shard_bytes)


@pytest.fixture
def config() -> DeepseekMoEConfig:
    return tiny_config()


@pytest.fixture
def released_checkpoint(tmp_path, config):
    """A tiny checkpoint written the way the released repos look (per-expert keys, several shards, auto_map)."""
    return write_random_released_checkpoint(config, tmp_path / "released", dtype=torch.float32, max_shard_bytes=20_000)
