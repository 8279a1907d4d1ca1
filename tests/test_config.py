import json

import pytest
import torch
from transformers import AutoConfig

from modeling_deepseekmoe import DeepseekMoEConfig, DeepseekMoEModel
from modeling_deepseekmoe.checkpoint import released_config_dict

from conftest import tiny_config

# deepseek-moe-16b-base's config.json, as released (the keys absent from it get the class defaults).
RELEASED_16B_CONFIG = {
    "architectures": ["DeepseekForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "model_type": "deepseek",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vocab_size": 102400,
}


def write_config(tmp_path, values):
    (tmp_path / "config.json").write_text(json.dumps(values))
    return tmp_path


def test_default_config_is_the_released_16b_base():
    config = DeepseekMoEConfig()
    for key, value in RELEASED_16B_CONFIG.items():
        if key in ("architectures", "auto_map", "model_type", "torch_dtype", "transformers_version"):
            continue
        assert getattr(config, key) == value, key
    assert config.aux_loss_alpha == 0.001 and config.seq_aux is True and config.pad_token_id is None
    assert config.moe_layer_indices == list(range(1, 28))


def test_released_config_json_loads_unchanged_through_autoconfig(tmp_path):
    config = AutoConfig.from_pretrained(write_config(tmp_path, RELEASED_16B_CONFIG))
    assert isinstance(config, DeepseekMoEConfig)
    assert config.rope_theta == 10000 and config.rope_scaling is None
    assert config.n_routed_experts == 64 and config.num_experts_per_tok == 6


def test_saved_config_keeps_every_released_key(tmp_path):
    loaded = DeepseekMoEConfig.from_pretrained(write_config(tmp_path, RELEASED_16B_CONFIG))
    loaded.architectures = ["DeepseekMoEForCausalLM"]
    loaded.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert set(RELEASED_16B_CONFIG) <= set(saved)
    assert saved["architectures"] == ["DeepseekForCausalLM"]
    assert saved["auto_map"] == RELEASED_16B_CONFIG["auto_map"]
    assert saved["torch_dtype"] == "bfloat16" and "dtype" not in saved
    assert "rope_parameters" not in saved
    for key, value in RELEASED_16B_CONFIG.items():
        if key != "transformers_version":
            assert saved[key] == value, key
    # No key TRL would read to add Mixtral's loss instead of ours.
    assert "router_aux_loss_coef" not in saved and "num_experts" not in saved


def test_released_config_writer_matches_the_released_file():
    assert released_config_dict(DeepseekMoEConfig()) == RELEASED_16B_CONFIG


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok \\(9\\) is larger than n_routed_experts \\(8\\)"),
        (dict(hidden_size=30), "hidden_size \\(30\\) is not divisible by num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(scoring_func="sigmoid"), "scoring_func='sigmoid' is not supported"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope type 'yarn' is not supported"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor must be a number > 1"),
        (dict(moe_layer_freq=0), "moe_layer_freq must be >= 1"),
        (dict(aux_loss_alpha=-1.0), "aux_loss_alpha must be >= 0"),
    ],
)
def test_invalid_config_fails_at_construction_naming_the_attribute(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("value", [0, None])
def test_no_shared_experts(value):
    config = tiny_config(n_shared_experts=value)
    assert config.n_shared_experts is None


def test_dense_model_when_no_routed_experts():
    config = tiny_config(n_routed_experts=None, num_experts_per_tok=None)
    assert config.moe_layer_indices == []


def test_moe_layer_placement_follows_first_k_and_freq():
    config = tiny_config(num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
    assert config.moe_layer_indices == [2, 4]


def test_rope_scaling_transformers_spelling_is_written_back_released(tmp_path):
    config = tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert config.rope_scaling == {"type": "linear", "factor": 2.0}


def test_wrong_model_type_is_refused(tmp_path):
    directory = write_config(tmp_path, {**RELEASED_16B_CONFIG, "model_type": "deepseek_v2"})
    with pytest.raises(ValueError, match="model_type 'deepseek_v2'.*not a DeepSeekMoE"):
        DeepseekMoEConfig.from_pretrained(directory)


# --- RoPE: transformers 5's rope_parameters and the released rope_theta / rope_scaling -------------------------------

LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0}


def test_rope_parameters_reach_the_rotary_embedding():
    config = tiny_config(rope_parameters=dict(LINEAR_ROPE))
    assert config.rope_parameters == LINEAR_ROPE
    assert config.rope_theta == 50000.0 and config.rope_scaling == {"type": "linear", "factor": 4.0}
    rotary = DeepseekMoEModel(config).rotary_emb
    assert (rotary.base, rotary.scaling_type, rotary.scaling_factor) == (50000.0, "linear", 4.0)
    torch.testing.assert_close(rotary.inv_freq, 1.0 / 50000.0 ** (torch.arange(0, 8, 2).float() / 8))


def test_rope_parameters_round_trip_through_the_released_keys(tmp_path):
    tiny_config(rope_parameters=dict(LINEAR_ROPE)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in saved
    assert saved["rope_theta"] == 50000.0 and saved["rope_scaling"] == {"type": "linear", "factor": 4.0}
    assert DeepseekMoEConfig.from_pretrained(tmp_path).rope_parameters == LINEAR_ROPE


def test_config_json_in_the_transformers_5_spelling_loads(tmp_path):
    values = {key: value for key, value in RELEASED_16B_CONFIG.items() if key not in ("rope_theta", "rope_scaling")}
    config = AutoConfig.from_pretrained(write_config(tmp_path, {**values, "rope_parameters": dict(LINEAR_ROPE)}))
    assert config.rope_parameters == LINEAR_ROPE


def test_released_rope_keys_give_the_same_parameters():
    released = tiny_config(rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 4.0})
    assert released.rope_parameters == LINEAR_ROPE
    assert tiny_config().rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_rope_attributes_can_be_set_after_construction():
    config = tiny_config()
    config.rope_scaling = {"type": "dynamic", "factor": 2.0}
    config.rope_theta = 20000
    assert config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 20000}
    config.rope_scaling = None
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 20000}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
        (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "rope type 'llama3' is not supported"),
        (dict(rope_scaling={"type": "longrope", "factor": 2.0}), "rope type 'longrope' is not supported"),
        (dict(rope_parameters={"rope_type": "linear"}), "factor must be a number > 1 for 'linear'"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), "rope_theta must be a number > 0"),
        (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "beta_fast": 32}), "beta_fast is not used"),
        (dict(rope_parameters=dict(LINEAR_ROPE), rope_theta=10000.0), "rope_theta is 50000.0 in one argument"),
        (dict(rope_parameters={"type": "linear", "rope_type": "dynamic", "factor": 2.0}), "keep one"),
    ],
)
def test_unsupported_or_conflicting_rope_fails_at_construction(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**overrides)


# --- A config.json describes one model: complete, in range ----------------------------------------------------------

@pytest.mark.parametrize("key", ["num_experts_per_tok", "n_routed_experts", "hidden_size", "rms_norm_eps", "model_type"])
def test_config_json_without_a_released_key_is_refused(tmp_path, key):
    values = {name: value for name, value in RELEASED_16B_CONFIG.items() if name != key}
    directory = write_config(tmp_path, values)
    with pytest.raises(ValueError, match=f"config.json has no {key}: every DeepSeekMoE config.json states it"):
        DeepseekMoEConfig.from_pretrained(directory)
    if key != "model_type":  # without it, transformers cannot tell which config class to use
        with pytest.raises(ValueError, match=f"no {key}"):
            AutoConfig.from_pretrained(directory)


def test_a_missing_key_is_named_with_the_released_value(tmp_path):
    values = {name: value for name, value in RELEASED_16B_CONFIG.items() if name != "num_experts_per_tok"}
    with pytest.raises(ValueError, match="deepseek-moe-16b: num_experts_per_tok=6"):
        DeepseekMoEConfig.from_pretrained(write_config(tmp_path, values))


def test_keys_the_released_config_lacks_keep_their_defaults(tmp_path):
    config = DeepseekMoEConfig.from_pretrained(write_config(tmp_path, RELEASED_16B_CONFIG))
    assert (config.aux_loss_alpha, config.seq_aux, config.pad_token_id) == (0.001, True, None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(rms_norm_eps=-1.0), "rms_norm_eps must be > 0"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps must be > 0"),
        (dict(num_attention_heads=0), "num_attention_heads must be a positive integer"),
        (dict(num_key_value_heads=0), "num_key_value_heads must be a positive integer"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size must be a positive integer"),
        (dict(hidden_size=32.0), "hidden_size"),
        (dict(num_experts_per_tok=2.5), "num_experts_per_tok"),
        (dict(hidden_act="swish-ish"), "hidden_act='swish-ish' is not an activation"),
        (dict(attention_dropout=1.5), "attention_dropout must be in"),
    ],
)
def test_out_of_range_config_fails_at_construction(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**overrides)


def test_out_of_range_config_json_is_refused(tmp_path):
    with pytest.raises(Exception, match="rms_norm_eps must be > 0"):
        AutoConfig.from_pretrained(write_config(tmp_path, {**RELEASED_16B_CONFIG, "rms_norm_eps": -1e-06}))
