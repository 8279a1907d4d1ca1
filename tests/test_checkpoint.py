import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from modeling_deepseekmoe import (
    DeepseekMoEConfig,
    DeepseekMoEForCausalLM,
    DeepseekMoEForSequenceClassification,
    DeepseekMoEModel,
)
from modeling_deepseekmoe.checkpoint import (
    BASE_MODEL,
    CAUSAL_LM,
    SEQUENCE_CLASSIFIER,
    CheckpointError,
    CheckpointShapeError,
    checkpoint_tensor_files,
    released_tensor_shapes,
    validate_checkpoint,
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


# --- Every class of the family loads what every class saved, in both expert layouts ---------------------------------

FAMILY = {
    "base": (DeepseekMoEModel, None),
    "causal_lm": (DeepseekMoEForCausalLM, "lm_head.weight"),
    "classifier": (DeepseekMoEForSequenceClassification, "score.weight"),
}


def backbone_state(model):
    return {name: tensor.detach().clone() for name, tensor in model.base_model.state_dict().items()}


@pytest.mark.parametrize("original_format", [True, False], ids=["released_layout", "fused_layout"])
@pytest.mark.parametrize("saver", FAMILY)
@pytest.mark.parametrize("loader", FAMILY)
def test_every_class_loads_what_every_class_saved(tmp_path, saver, loader, original_format):
    config = tiny_config(num_labels=3, pad_token_id=1)
    saver_class, saver_head = FAMILY[saver]
    loader_class, loader_head = FAMILY[loader]
    torch.manual_seed(0)
    saved_model = saver_class(config)
    saved_model.save_pretrained(tmp_path, save_original_format=original_format)
    stored = load_file(tmp_path / "model.safetensors")
    expert_key = f"{'' if saver == 'base' else 'model.'}layers.1.mlp.experts.gate_up_proj"
    assert (expert_key in stored) is not original_format

    model, info = loader_class.from_pretrained(tmp_path, output_loading_info=True)

    loaded = backbone_state(model)
    assert loaded.keys() == backbone_state(saved_model).keys()
    for name, tensor in backbone_state(saved_model).items():
        assert torch.equal(loaded[name], tensor), name
    # transformers' semantics: the loader's own head is new when another class saved the checkpoint, and another
    # class's head is dropped; nothing else.
    assert set(info["missing_keys"]) == ({loader_head} if loader_head and loader_head != saver_head else set())
    assert set(info["unexpected_keys"]) == ({saver_head} if saver_head and saver_head != loader_head else set())
    assert not info["mismatched_keys"]
    if loader_head and loader_head == saver_head:
        assert torch.equal(model.state_dict()[loader_head], saved_model.state_dict()[loader_head])


def test_fused_layout_save_reloads_with_identical_logits(tmp_path, config):
    torch.manual_seed(0)
    model = DeepseekMoEForCausalLM(config).eval()
    model.save_pretrained(tmp_path, save_original_format=False)
    assert validate_checkpoint(tmp_path, config) == CAUSAL_LM
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(2, 96, (2, 9))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("model_class", "kind"),
    [(DeepseekMoEModel, BASE_MODEL), (DeepseekMoEForCausalLM, CAUSAL_LM),
     (DeepseekMoEForSequenceClassification, SEQUENCE_CLASSIFIER)],
)  # fmt: skip
def test_validate_checkpoint_accepts_each_class_own_save(tmp_path, config, model_class, kind):
    model_class(config).save_pretrained(tmp_path)
    assert validate_checkpoint(tmp_path, DeepseekMoEConfig.from_pretrained(tmp_path)) == kind


def test_missing_fused_expert_tensor_is_named(tmp_path, config):
    DeepseekMoEForCausalLM(config).save_pretrained(tmp_path, save_original_format=False)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.down_proj"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.2.mlp.experts.down_proj"):
        DeepseekMoEForCausalLM.from_pretrained(tmp_path)


def test_causal_lm_checkpoint_without_its_head_is_refused(released_checkpoint):
    rewrite_shard_without(released_checkpoint, "lm_head.weight")
    with pytest.raises(CheckpointError, match="causal LM head lm_head.weight is missing.*re-download"):
        AutoModelForCausalLM.from_pretrained(released_checkpoint)


def test_classifier_checkpoint_without_its_head_is_refused(tmp_path):
    config = tiny_config(num_labels=3, pad_token_id=1)
    DeepseekMoEForSequenceClassification(config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["score.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="sequence classifier head score.weight is missing"):
        DeepseekMoEForSequenceClassification.from_pretrained(tmp_path)


@pytest.fixture
def classifier_checkpoint(tmp_path):
    config = tiny_config(num_labels=3, pad_token_id=1)
    torch.manual_seed(0)
    model = DeepseekMoEForSequenceClassification(config)
    model.save_pretrained(tmp_path / "classifier")
    return tmp_path / "classifier", model


@pytest.mark.parametrize("load", [
    lambda path, **kw: AutoModelForSequenceClassification.from_pretrained(path, num_labels=42, **kw),
    lambda path, **kw: DeepseekMoEForSequenceClassification.from_pretrained(path, num_labels=42, **kw),
], ids=["auto_class", "model_class"])  # fmt: skip
def test_new_label_count_needs_ignore_mismatched_sizes(classifier_checkpoint, load):
    path, saved = classifier_checkpoint
    with pytest.raises(RuntimeError, match="score.weight|ignore_mismatched_sizes"):
        load(path)
    model, info = load(path, ignore_mismatched_sizes=True, output_loading_info=True)
    assert model.score.weight.shape == (42, saved.config.hidden_size)
    assert [key for key, *_ in info["mismatched_keys"]] == ["score.weight"]
    for name, tensor in backbone_state(saved).items():
        assert torch.equal(backbone_state(model)[name], tensor), name
    assert model(torch.randint(2, 96, (2, 5))).logits.shape == (2, 42)


def test_backbone_shape_mismatch_is_named_and_allowed_only_when_asked(classifier_checkpoint):
    path, _ = classifier_checkpoint
    smaller_vocab = tiny_config(num_labels=3, pad_token_id=1, vocab_size=10)
    with pytest.raises(CheckpointShapeError, match=r"model.embed_tokens.weight has shape \[96, 32\].*ignore_mismatched_sizes=True"):
        AutoModel.from_pretrained(path, config=smaller_vocab)
    model, info = AutoModel.from_pretrained(path, config=smaller_vocab, ignore_mismatched_sizes=True, output_loading_info=True)
    assert model.embed_tokens.weight.shape == (10, 32)
    assert [key for key, *_ in info["mismatched_keys"]] == ["embed_tokens.weight"]


def test_a_stray_tensor_is_refused_even_next_to_another_class_head(tmp_path, config):
    DeepseekMoEForCausalLM(config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.experts.9.up_proj.weight"] = torch.zeros(16, 32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) for this config: model.layers.1.mlp.experts.9"):
        DeepseekMoEForSequenceClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize("weight_format", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_non_floating_point_tensor_in_a_float_checkpoint_is_refused(tmp_path, config, weight_format, dtype):
    directory = write_random_released_checkpoint(
        config, tmp_path / "ckpt", dtype=torch.float32, max_shard_bytes=20_000, weight_format=weight_format
    )
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    file_name = checkpoint_tensor_files(directory)[name]
    if weight_format == "safetensors":
        tensors = load_file(directory / file_name)
        tensors[name] = torch.ones(tensors[name].shape, dtype=dtype)
        save_file(tensors, directory / file_name, metadata={"format": "pt"})
    else:
        tensors = torch.load(directory / file_name, weights_only=True)
        tensors[name] = torch.ones(tensors[name].shape, dtype=dtype)
        torch.save(tensors, directory / file_name)
    with pytest.raises(CheckpointError, match=f"non-floating-point tensor\\(s\\): {name} is "):
        validate_checkpoint(directory, config)
    with pytest.raises(CheckpointError, match="non-floating-point"):
        AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("model_type", ["llama", None])
def test_checkpoint_whose_model_type_is_not_deepseek_is_refused(released_checkpoint, config, model_type):
    config_path = released_checkpoint / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json.pop("model_type")
    if model_type:
        config_json["model_type"] = model_type
    config_path.write_text(json.dumps(config_json))
    with pytest.raises(CheckpointError, match=f"model_type {model_type!r}, not 'deepseek'"):
        validate_checkpoint(released_checkpoint, config)


def test_the_weights_the_loader_reads_are_the_ones_checked(tmp_path, config):
    """transformers reads model.safetensors before a .bin index: a stale .bin index beside it is not what loads."""
    torch.manual_seed(0)
    DeepseekMoEForCausalLM(config).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "gone.bin"}}))
    assert validate_checkpoint(tmp_path, config) == CAUSAL_LM
    AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="missing from .*gone.bin"):
        validate_checkpoint(tmp_path, config, use_safetensors=False)


def test_truncated_shard_is_named(released_checkpoint):
    shard = sorted(released_checkpoint.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=f"{shard.name} cannot be read .*download it again"):
        AutoModelForCausalLM.from_pretrained(released_checkpoint)


def test_auto_classes_load_a_base_model_save(tmp_path):
    config = tiny_config(num_labels=3, pad_token_id=1)
    torch.manual_seed(0)
    saved = DeepseekMoEModel(config)
    saved.save_pretrained(tmp_path)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DeepseekMoEModel)
    classifier, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"score.weight"}
    assert torch.equal(classifier.model.embed_tokens.weight, saved.embed_tokens.weight)
