"""The one loader (modeling_deepseekmoe.loading, finetune.adapters), the routing record (modeling_deepseekmoe.routing)
and the shared row formats (finetune.formats), on tiny models on CPU."""

import argparse
import importlib.util
import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from deepseekmoe.eval.analysis import load_samples, tokenize_samples
from deepseekmoe.finetune.adapters import (
    add_loading_arguments,
    adapter_kind,
    load_model,
    load_tokenizer,
    loading_options,
)
from deepseekmoe.finetune.esft.adapter import save_esft_adapter
from deepseekmoe.finetune.formats import standardize_row
from deepseekmoe.finetune.lora import build_lora_config
from modeling_deepseekmoe import DeepseekMoEForCausalLM
from modeling_deepseekmoe.loading import (
    QuantizationArguments,
    default_compute_dtype,
    model_reference,
    quantization_config,
    resolve_dtype,
)
from modeling_deepseekmoe.routing import (
    decoder_layer_index,
    expert_counts,
    moe_blocks,
    record_routing,
)
from modeling_deepseekmoe.tokenization import build_tokenizer

from conftest import tiny_config


needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is not installed")  # fmt: skip


def ids(length=12, seed=0):
    return torch.randint(2, 96, (2, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- quantization flags
def test_load_in_4bit_means_nf4_with_double_quant_and_the_dtype_as_compute():
    config = quantization_config(load_in_4bit=True, dtype="float32")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32
    assert quantization_config(load_in_4bit=True).bnb_4bit_compute_dtype == default_compute_dtype()
    chosen = quantization_config(load_in_4bit=True, dtype="float32", bnb_4bit_compute_dtype="bfloat16",
                                 bnb_4bit_quant_type="fp4", use_bnb_nested_quant=False)  # fmt: skip
    assert (chosen.bnb_4bit_compute_dtype, chosen.bnb_4bit_quant_type, chosen.bnb_4bit_use_double_quant) == (
        torch.bfloat16, "fp4", False)
    assert quantization_config(load_in_8bit=True).load_in_8bit and quantization_config() is None
    with pytest.raises(ValueError, match="Choose one of --load_in_4bit and --load_in_8bit"):
        quantization_config(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="bnb_4bit_quant_type must be one of"):
        QuantizationArguments(load_in_4bit=True, bnb_4bit_quant_type="int4")
    with pytest.raises(ValueError, match="Unknown dtype 'bf16'"):
        resolve_dtype("bf16")


def test_compute_dtype_default_is_bf16_where_the_device_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert default_compute_dtype() == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert default_compute_dtype() == torch.float32


def test_every_command_gets_the_same_loading_flags():
    parser = argparse.ArgumentParser()
    add_loading_arguments(parser)
    args = parser.parse_args(["--adapter_name_or_path", "runs/a", "--dtype", "bfloat16", "--load_in_4bit",
                              "--use_bnb_nested_quant", "false", "--bnb_4bit_compute_dtype", "float32"])  # fmt: skip
    options = loading_options(args)
    assert options["adapter"] == "runs/a" and options["dtype"] == "bfloat16" and options["load_in_4bit"]
    assert options["use_bnb_nested_quant"] is False and options["bnb_4bit_quant_type"] == "nf4"
    bnb = QuantizationArguments.from_dict(options).bnb_config(options["dtype"])
    assert bnb.bnb_4bit_compute_dtype == torch.float32 and not bnb.bnb_4bit_use_double_quant


def test_local_paths_are_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_reference("base") == str(tmp_path / "base")
    assert model_reference("deepseek-ai/deepseek-moe-16b-base") == "deepseek-ai/deepseek-moe-16b-base"
    with pytest.raises(FileNotFoundError, match="No checkpoint at ./missing"):
        model_reference("./missing")


# ---------------------------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tokenizer = build_tokenizer(300, save_directory=directory)
    config = tiny_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    DeepseekMoEForCausalLM(config).save_pretrained(directory)
    return directory


def base_model(base_dir):
    return DeepseekMoEForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def expert_lora(base_dir, tmp_path_factory):
    """A LoRA adapter on attention and the routed experts (the default targets), with non-zero B."""
    torch.manual_seed(1)
    model = get_peft_model(base_model(base_dir), build_lora_config("all", r=4, lora_alpha=8, init_lora_weights=False))
    directory = tmp_path_factory.mktemp("lora")
    model.save_pretrained(directory)
    with torch.no_grad():
        expected = model.eval()(ids()).logits
    return directory, expected


def test_expert_lora_loads_through_the_one_loader_where_plain_peft_fails(base_dir, expert_lora):
    directory, expected = expert_lora
    assert adapter_kind(directory) == "lora"
    with pytest.raises(ValueError, match="not supported"):
        PeftModel.from_pretrained(base_model(base_dir), str(directory))
    loaded = load_model(base_dir, adapter=directory, dtype="float32").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, expected)


def test_esft_adapter_is_recognised_and_refused_on_a_quantized_base(base_dir, tmp_path):
    model = base_model(base_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj[2] += 1.0
    save_esft_adapter(model, {"experts": {"1": [2]}}, tmp_path / "esft", str(base_dir))
    assert adapter_kind(tmp_path / "esft") == "esft"
    with torch.no_grad():
        torch.testing.assert_close(load_model(base_dir, adapter=tmp_path / "esft").eval()(ids()).logits,
                                   model(ids()).logits)  # fmt: skip
    with pytest.raises(ValueError, match="cannot be written into 4/8-bit experts"):
        load_model(base_dir, adapter=tmp_path / "esft", load_in_4bit=True)


def test_adapter_directories_are_recognised_by_their_files(base_dir, tmp_path):
    with pytest.raises(ValueError, match="is a full checkpoint, not an adapter"):
        adapter_kind(base_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither adapter_config.json .* nor esft_adapter.json"):
        adapter_kind(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="No adapter directory"):
        load_model(base_dir, adapter=tmp_path / "missing")


def test_tokenizer_comes_from_the_adapter_when_it_has_one(base_dir, tmp_path):
    tokenizer = load_tokenizer(base_dir)
    tokenizer.chat_template = "{{ 'custom' }}"
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert load_tokenizer(base_dir, adapter=tmp_path / "adapter").chat_template == "{{ 'custom' }}"
    assert load_tokenizer(base_dir, adapter=tmp_path / "elsewhere").chat_template != "{{ 'custom' }}"


@needs_bitsandbytes
def test_load_in_4bit_quantizes_the_experts_too(released_checkpoint):
    from modeling_deepseekmoe.quantization import DeepseekMoEQuantizedExperts

    model = load_model(released_checkpoint, dtype="float32", load_in_4bit=True)
    assert isinstance(model.model.layers[1].mlp.experts, DeepseekMoEQuantizedExperts)
    saved = model.config.quantization_config
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    assert saved["bnb_4bit_quant_type"] == "nf4" and saved["bnb_4bit_use_double_quant"]


# ---------------------------------------------------------------------------------------------- routing record
def test_the_routing_record_holds_what_the_routers_decided():
    model = DeepseekMoEForCausalLM(tiny_config()).eval()
    gates = {layer: block.gate for layer, block in moe_blocks(model).items()}
    assert list(gates) == [1, 2]
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    with torch.no_grad(), record_routing(model) as routing:
        model(ids(), attention_mask=mask)
    hidden = {}
    for layer, output in routing.outputs.items():
        assert output.top_k_index.shape == (24, 3) and output.scores.shape == (24, 8)
        expected = torch.zeros(8)
        for token, experts in enumerate(output.top_k_index.tolist()):
            for expert in experts:
                expected[expert] += float(mask.reshape(-1)[token])
        torch.testing.assert_close(routing.expert_counts(mask)[layer], expected)
        selected = torch.zeros(8).index_add_(0, output.top_k_index.reshape(-1), output.top_k_weights.reshape(-1))
        torch.testing.assert_close(routing.expert_weight_sums()[layer], selected)
        hidden[layer] = output
    assert routing.load(mask).shape == (2, 8) and routing.load(mask).sum() == 19 * 3 * 2
    assert not any(gate._forward_hooks for gate in gates.values())
    with pytest.raises(ValueError, match="token_weight has 5 values for 24 routed tokens"):
        routing.expert_counts(torch.ones(5))
    assert expert_counts(torch.tensor([[0, 1], [1, 2]]), 4).tolist() == [1, 2, 1, 0]


def test_the_record_reads_peft_wrapped_models_and_can_skip_eval_forwards():
    model = get_peft_model(DeepseekMoEForCausalLM(tiny_config()), build_lora_config("all", r=2))
    with record_routing(model, training_only=True, keep_scores=False) as routing:
        with torch.no_grad():
            model.eval()(ids())
        assert routing.outputs == {}
        model.train()(ids())
    assert list(routing.outputs) == [1, 2] and routing.outputs[1].scores is None
    assert decoder_layer_index("base_model.model.model.layers.2.mlp.gate") == 2
    assert decoder_layer_index("model.layers.11.mlp.experts.3.up_proj.weight") == 11
    with pytest.raises(ValueError, match="names no decoder layer"):
        decoder_layer_index("model.embed_tokens")


# ---------------------------------------------------------------------------------------------- row formats
CONVERSATION = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_sharegpt_and_alpaca_rows_become_messages():
    sharegpt = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    assert standardize_row(sharegpt) == {"messages": CONVERSATION}
    alpaca = {"instruction": "Add", "input": "2+2", "output": "4"}
    assert standardize_row(alpaca)["messages"] == [{"role": "user", "content": "Add\n\n2+2"},
                                                   {"role": "assistant", "content": "4"}]  # fmt: skip
    assert standardize_row({"text": "plain"}) == {"text": "plain"}


def test_analysis_reads_the_formats_sft_reads(base_dir, tmp_path):
    tokenizer = load_tokenizer(base_dir)
    rows = [
        {"messages": CONVERSATION, "domain": "chat"},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"instruction": "2+2?", "output": "4"},
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": CONVERSATION[:1], "completion": CONVERSATION[1:]},
        {"text": "plain text"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match="line 1 is a conversation: pass the tokenizer"):
        load_samples(path)
    samples = load_samples(path, tokenizer=tokenizer)
    assert [sample.domain for sample in samples] == ["chat"] + ["rows"] * 5
    assert samples[3].text == "2+2=4" and samples[5].text == "plain text"
    encoded = tokenize_samples(tokenizer, samples)
    chat_ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    for row in (0, 1, 2, 4):  # conversations: the token ids the chat template gives, one BOS
        assert list(encoded[row].input_ids) == list(chat_ids)
