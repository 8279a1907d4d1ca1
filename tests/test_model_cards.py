"""Model cards (deepseekmoe.model_cards.card): one test per kind, asserting the recorded method, hyper-parameters and
base model, and that the loading snippet loads the model the way it was trained."""

import importlib.util
import json
import re

import pytest
import torch
from huggingface_hub import ModelCard
from peft import get_peft_model

from deepseekmoe.finetune.esft.adapter import save_esft_adapter
from deepseekmoe.finetune.lora import build_lora_config
from deepseekmoe.finetune.sft import parse_sft_args
from deepseekmoe.model_cards.card import (
    read_training_setup,
    set_eval_table,
    training_setup,
    write_base_card,
    write_merged_card,
    write_training_card,
)
from modeling_deepseekmoe import DeepseekMoEForCausalLM
from modeling_deepseekmoe.checkpoint import write_random_released_checkpoint
from modeling_deepseekmoe.tokenization import build_tokenizer

from conftest import tiny_config


SELECTION = {"experts": {"1": [0, 3], "2": [5]}, "shared_experts": False, "non_expert_modules": False}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with a tiny base checkpoint (tokenizer included) at the relative path `base`."""
    tokenizer = build_tokenizer(300, save_directory=tmp_path / "base")
    config = tiny_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    DeepseekMoEForCausalLM(config).save_pretrained(tmp_path / "base")
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def setup_of(*flags, expert_config=None):
    """The training setup of a run with these flags, as typed by a user (relative paths)."""
    argv = ["--model_name_or_path", "base", "--dataset_name", "train.jsonl", "--output_dir", "out", "--max_steps", "7",
            "--learning_rate", "2e-4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3",
            "--bf16", "false", "--use_cpu", "true", "--dtype", "float32", "--report_to", "none", *flags]  # fmt: skip
    model_args, data_args, training_args = parse_sft_args(argv)
    return training_setup(model_args, data_args, training_args, steps=7, expert_config=expert_config)


def card(directory):
    text = (directory / "README.md").read_text()
    return ModelCard.load(directory / "README.md").data.to_dict(), text


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def python_snippet(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_base_card_claims_reference_loading_only_with_its_files(workdir):
    released = write_random_released_checkpoint(tiny_config(), workdir / "released", dtype=torch.float32)
    write_base_card(released, origin="Converted from `x` by `deepseekmoe convert`.")
    metadata, text = card(released)
    assert "Converted from `x`" in text
    assert "modeling files (configuration_deepseek.py, modeling_deepseek.py) are not in" in text
    assert "DeepseekForCausalLM" in text and metadata["tags"] == ["deepseekmoe", "mixture-of-experts"]
    assert f'from_pretrained("{released}"' in text and "3 layers (2 MoE)" in section(text, "Architecture")

    write_base_card(workdir / "base")  # saved by save_pretrained, no auto_map: no claim about the reference code
    _, text = card(workdir / "base")
    assert "has no `auto_map`: the reference remote code cannot load" in text
    assert "reference remote code loads it too" not in text


def test_full_fine_tune_card(workdir):
    write_training_card(workdir / "base", setup_of())  # a full fine-tune's output holds the whole model
    metadata, text = card(workdir / "base")
    assert metadata["base_model"] == str(workdir / "base") and "sft" in metadata["tags"]
    assert metadata["training_setup"]["method"] == "full fine-tuning"
    training = section(text, "Training")
    for row in ("| method | full fine-tuning |", "| steps | 7 |", "| learning rate | 0.0002 (linear) |",
                f"| data | `{workdir / 'train.jsonl'}` (auto format) |", "| precision | fp32, weights float32 |",
                "| batch | 2 per device x 3 accumulation x 1 process(es) |", "| base quantization | none |"):
        assert row in training, row
    assert "LoRA" not in training and "layers (" not in training
    assert "AutoModelForCausalLM.from_pretrained" in section(text, "Loading")


def test_lora_card_records_rank_alpha_targets_and_its_snippet_loads_the_adapter(workdir):
    setup = setup_of("--use_peft", "--lora_r", "4", "--lora_alpha", "32", "--lora_target_modules", "attention",
                     "experts", "--lora_layers", "2")  # fmt: skip
    model = DeepseekMoEForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
    get_peft_model(model, build_lora_config(["attention", "experts"], layers=[2], r=4, lora_alpha=32)).save_pretrained(
        workdir / "lora")
    write_training_card(workdir / "lora", setup)
    metadata, text = card(workdir / "lora")
    assert metadata["library_name"] == "peft" and metadata["base_model_relation"] == "adapter"
    assert metadata["base_model"] == str(workdir / "base")
    assert metadata["training_setup"]["lora"]["r"] == 4 and metadata["training_setup"]["lora"]["lora_alpha"] == 32
    training = section(text, "Training")
    for row in ("| method | LoRA |", "| LoRA rank (r) | 4 |", "| LoRA alpha | 32 |", "| LoRA targets | attention, "
                "experts |", "| LoRA layers | 2 |"):  # fmt: skip
        assert row in training, row
    namespace = {}
    exec(python_snippet(text), namespace)
    assert "load_in_4bit" not in python_snippet(text)
    assert type(namespace["model"]).__name__.startswith("Peft")
    assert namespace["model"].base_model.model.model.layers[2].mlp.experts.lora_A["default"].gate_up.shape[0] > 0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_card_loads_the_base_in_4bit_as_trained(workdir):
    setup = setup_of("--use_peft", "--load_in_4bit", "--lora_target_modules", "attention")
    model = DeepseekMoEForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
    get_peft_model(model, build_lora_config("attention", r=2)).save_pretrained(workdir / "qlora")
    write_training_card(workdir / "qlora", setup)
    metadata, text = card(workdir / "qlora")
    assert "qlora" in metadata["tags"] and metadata["training_setup"]["method"] == "QLoRA"
    assert "| base quantization | 4-bit nf4, double quantization, float32 compute (bitsandbytes) |" in text
    snippet = python_snippet(text)
    assert 'load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True' in snippet
    assert "--load_in_4bit" in section(text, "Loading")
    namespace = {}
    exec(snippet, namespace)
    assert namespace["model"].get_base_model().is_loaded_in_4bit


def test_esft_adapter_card_lists_the_trained_experts(workdir):
    tuned = DeepseekMoEForCausalLM.from_pretrained(workdir / "base")
    with torch.no_grad():
        tuned.model.layers[1].mlp.experts.gate_up_proj[3] += 1.0
    save_esft_adapter(tuned, SELECTION, workdir / "esft")
    write_training_card(workdir / "esft", setup_of(expert_config=SELECTION))
    metadata, text = card(workdir / "esft")
    assert "esft" in metadata["tags"] and "sft" not in metadata["tags"]
    assert metadata["base_model"] == str(workdir / "base")
    assert metadata["training_setup"]["esft"]["experts"] == {"1": [0, 3], "2": [5]}
    selection = section(text, "Expert selection")
    assert "| 1 | 2: 0, 3 |" in selection and "| 2 | 1: 5 |" in selection
    assert "| method | ESFT |" in section(text, "Training") and " MB)" in text
    namespace = {}
    exec(python_snippet(text), namespace)
    torch.testing.assert_close(namespace["model"].model.layers[1].mlp.experts.gate_up_proj,
                               tuned.model.layers[1].mlp.experts.gate_up_proj)  # fmt: skip


def test_merged_card_carries_the_adapters_training_not_the_architecture(workdir):
    setup = setup_of("--use_peft", "--lora_r", "16", "--lora_alpha", "8", "--lora_target_modules", "all")
    (workdir / "lora").mkdir()
    (workdir / "lora" / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 8}))
    write_training_card(workdir / "lora", setup)
    config = DeepseekMoEForCausalLM.from_pretrained(workdir / "base").config
    (workdir / "merged").mkdir()
    write_merged_card(workdir / "merged", workdir / "lora", config)
    metadata, text = card(workdir / "merged")
    recorded = read_training_setup(workdir / "merged")
    assert recorded.method == "LoRA" and recorded.lora["r"] == 16 and recorded.merged_from == str(workdir / "lora")
    assert metadata["base_model"] == str(workdir / "base") and "merged" in metadata["tags"]
    training = section(text, "Training (of the merged adapter)")
    assert "| LoRA rank (r) | 16 |" in training and "| LoRA alpha | 8 |" in training and "layers (" not in training
    assert "3 layers (2 MoE)" in section(text, "Architecture")
    assert 'AutoModelForCausalLM.from_pretrained("' + str(workdir / "merged") in text
    set_eval_table(workdir / "merged", "| task | acc |\n|---|---|\n| x | 1 |")
    assert read_training_setup(workdir / "merged").lora["r"] == 16  # the eval table keeps the metadata


def test_merged_card_without_an_adapter_card_reads_the_adapter_files(workdir):
    (workdir / "lora").mkdir()
    (workdir / "lora" / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "base_model_name_or_path": str(workdir / "base")}))
    (workdir / "lora" / "sft_run.json").write_text(json.dumps({"quantization": "4bit", "model_args": {
        "model_name_or_path": "base", "load_in_4bit": True, "dtype": "bfloat16",
        "lora_target_modules": ["attention"]}, "data_args": {"dataset_name": "train.jsonl"}}))
    (workdir / "merged").mkdir()
    write_merged_card(workdir / "merged", workdir / "lora")
    recorded = read_training_setup(workdir / "merged")
    assert recorded.method == "QLoRA" and recorded.lora["r"] == 8 and recorded.lora["target_modules"] == ["attention"]
    assert recorded.quantization["bnb_4bit_compute_dtype"] == "bfloat16"
    assert "base loaded in 4-bit nf4, double quantization, bfloat16 compute" in card(workdir / "merged")[1]


def test_esft_merged_card_is_tagged_esft_and_names_the_experts(workdir):
    save_esft_adapter(DeepseekMoEForCausalLM.from_pretrained(workdir / "base"), SELECTION, workdir / "esft",
                      str(workdir / "base"))  # fmt: skip
    write_training_card(workdir / "esft", setup_of(expert_config=SELECTION))
    (workdir / "merged").mkdir()
    write_merged_card(workdir / "merged", workdir / "esft")
    metadata, text = card(workdir / "merged")
    assert "esft" in metadata["tags"] and "sft" not in metadata["tags"] and "merged" in metadata["tags"]
    assert "| 1 | 2: 0, 3 |" in section(text, "Expert selection")
    assert "| method | ESFT |" in section(text, "Training (of the merged adapter)")
    assert metadata["base_model"] == str(workdir / "base")
