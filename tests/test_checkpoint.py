import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from modeling_deepseekmoe import DeepseekMoEForCausalLM, DeepseekMoEModel
from modeling_deepseekmoe.checkpoint import (
    CheckpointError,
    checkpoint_tensor_files,
    released_tensor_shapes,
    write_random_released_checkpoint,
)

from conftest import tiny_config

REMOTE_CODE_TRAP = 'raise RuntimeError("the remote code of the checkpoint was executed")\n'


def stored_tensors(directory):
    tensors = {}
    for name, file_name in checkpoint_tensor_files(directory).items():
        path = directory / file_name
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                tensors[name] = handle.get_tensor(name)
        else:
            tensors[name] = torch.load(path, weights_only=True)[name]
    return tensors


def test_released_layout_has_the_released_tensor_count_at_16b():
    from modeling_deepseekmoe import DeepseekMoEConfig

    shapes = released_tensor_shapes(DeepseekMoEConfig())
    assert len(shapes) == 5466
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 16_375_728_128
    assert shapes["model.layers.1.mlp.experts.63.down_proj.weight"] == (2048, 1408)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (10944, 2048)


def test_auto_loads_released_dir_natively_without_running_its_remote_code(released_checkpoint, config):
    (released_checkpoint / "modeling_deepseek.py").write_text(REMOTE_CODE_TRAP)
    (released_checkpoint / "configuration_deepseek.py").write_text(REMOTE_CODE_TRAP)
    assert "auto_map" in json.loads((released_checkpoint / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(released_checkpoint)
    assert isinstance(model, DeepseekMoEForCausalLM)
    assert isinstance(AutoModel.from_pretrained(released_checkpoint), DeepseekMoEModel)

    stored = stored_tensors(released_checkpoint)
    experts = model.model.layers[2].mlp.experts
    for expert in range(config.n_routed_experts):
        prefix = f"model.layers.2.mlp.experts.{expert}"
        gate_up = torch.cat([stored[f"{prefix}.gate_proj.weight"], stored[f"{prefix}.up_proj.weight"]])
        assert torch.equal(experts.gate_up_proj[expert], gate_up)
        assert torch.equal(experts.down_proj[expert], stored[f"{prefix}.down_proj.weight"])
    assert torch.equal(model.model.layers[1].mlp.gate.weight, stored["model.layers.1.mlp.gate.weight"])
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])


def test_load_then_save_reproduces_keys_shapes_and_values(released_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(released_checkpoint)
    model.save_pretrained(tmp_path / "saved", max_shard_size="20KB")
    original, saved = stored_tensors(released_checkpoint), stored_tensors(tmp_path / "saved")
    assert saved.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(saved[name], tensor), name
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    generation = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert generation["pad_token_id"] == generation["eos_token_id"]


def test_reloaded_model_gives_identical_logits(tmp_path, config):
    torch.manual_seed(0)
    model = DeepseekMoEForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(2, 96, (2, 9))
    # Also checks that RoPE's non-persistent inv_freq is computed after the meta-device load.
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_pytorch_bin_shards_load(tmp_path, config):
    directory = write_random_released_checkpoint(
        config, tmp_path / "bin", dtype=torch.float32, max_shard_bytes=20_000, weight_format="bin"
    )
    assert (directory / "pytorch_model.bin.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(directory)
    stored = stored_tensors(directory)
    assert torch.equal(model.model.layers[1].mlp.experts.down_proj[3], stored["model.layers.1.mlp.experts.3.down_proj.weight"])


def rewrite_shard_without(directory, tensor_name, replacement=None):
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    file_name = index["weight_map"][tensor_name]
    tensors = load_file(directory / file_name)
    if replacement is None:
        del tensors[tensor_name]
        del index["weight_map"][tensor_name]
    else:
        tensors[tensor_name] = replacement
    save_file(tensors, directory / file_name, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def test_missing_shard_is_named(released_checkpoint):
    shard = sorted(released_checkpoint.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing from .*{shard.name}"):
        AutoModelForCausalLM.from_pretrained(released_checkpoint)


def test_missing_expert_tensor_is_named(released_checkpoint):
    rewrite_shard_without(released_checkpoint, "model.layers.2.mlp.experts.5.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.2.mlp.experts.5.up_proj.weight"):
        AutoModelForCausalLM.from_pretrained(released_checkpoint)


def test_extra_expert_tensor_is_named(released_checkpoint):
    index_path = released_checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    save_file({"model.layers.1.mlp.experts.8.gate_proj.weight": torch.zeros(16, 32)},
              released_checkpoint / "extra.safetensors")
    index["weight_map"]["model.layers.1.mlp.experts.8.gate_proj.weight"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) .*model.layers.1.mlp.experts.8.gate_proj"):
        AutoModelForCausalLM.from_pretrained(released_checkpoint)


def test_shape_mismatch_with_config_is_named(released_checkpoint):
    config_path = released_checkpoint / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json["moe_intermediate_size"] = 24
    config_path.write_text(json.dumps(config_json))
    with pytest.raises(CheckpointError, match=r"shape mismatch: model.layers.1.mlp.experts.0.gate_proj.weight has shape \[16, 32\]"):
        AutoModelForCausalLM.from_pretrained(released_checkpoint)


def test_tensor_listed_but_absent_from_its_shard_is_named(released_checkpoint):
    name = "model.layers.1.mlp.gate.weight"
    index = json.loads((released_checkpoint / "model.safetensors.index.json").read_text())
    rewrite_shard_without(released_checkpoint, name)
    (released_checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not in their shard, e.g. model.layers.1.mlp.gate.weight"):
        AutoModelForCausalLM.from_pretrained(released_checkpoint)


def test_config_of_another_model_type_is_refused(released_checkpoint):
    config_path = released_checkpoint / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json["model_type"] = "llama"
    config_path.write_text(json.dumps(config_json))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        DeepseekMoEForCausalLM.from_pretrained(released_checkpoint)


def test_directory_without_weights_is_named(tmp_path, config):
    config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds no weights"):
        DeepseekMoEForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_of_a_smaller_model_is_refused_even_when_config_is_passed(released_checkpoint):
    bigger = tiny_config(num_hidden_layers=4)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.3"):
        DeepseekMoEForCausalLM.from_pretrained(released_checkpoint, config=bigger)
