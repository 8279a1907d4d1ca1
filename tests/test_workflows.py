"""The documented workflows chained as a user runs them, on a tiny released-layout checkpoint (per-expert shards,
auto_map) with its tokenizer, through the library and the `deepseekmoe` command where its flags already fit:

- LoRA SFT with the default targets (routed experts included) -> eval with the adapter -> merge -> eval merged
  (same scores) -> chat;
- QLoRA -> chat with the adapter on the 4-bit base;
- ESFT score -> select -> train -> eval with the adapter -> merge -> eval merged (same scores);
- routing analysis of a 4-bit model on chat data.
"""

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from deepseekmoe.cli import main
from deepseekmoe.eval.analysis import analyze, load_samples
from deepseekmoe.eval.harness import evaluate
from deepseekmoe.eval.inference import chat_input_ids, load_for_inference
from deepseekmoe.finetune.adapters import adapter_kind, load_model, load_tokenizer
from deepseekmoe.finetune.merge import merge_adapter
from deepseekmoe.finetune.sft import parse_sft_args, run_sft

from conftest import write_tiny_checkpoint
from test_eval import offline, shared_task_index  # noqa: F401  (no hub; one lm-eval task index for the module)


needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is not installed")  # fmt: skip
WORDS = ["apple", "river", "stone", "cloud", "light", "green", "table", "music"]
CHAT_ROWS = [{"messages": [{"role": "user", "content": f"Repeat: {word}"},
                           {"role": "assistant", "content": f"{word} {word}"}]} for word in WORDS]  # fmt: skip
SUM_ROWS = [{"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]]  # fmt: skip
TRAIN_FLAGS = [
    "--max_steps", "3", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--lr_scheduler_type",
    "constant", "--logging_steps", "1", "--save_strategy", "no", "--bf16", "false", "--use_cpu", "true",
    "--max_length", "64", "--dtype", "float32", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
    "--dataloader_num_workers", "0",
]  # fmt: skip
EVAL_TASKS = ["dsmoe_tiny_arc", "dsmoe_tiny_pile"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint in the released layout, with a tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("released"), max_position_embeddings=256,
                                 max_shard_bytes=200_000)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    return {"chat": write_jsonl(directory / "chat.jsonl", CHAT_ROWS), "sums": write_jsonl(directory / "sums.jsonl",
                                                                                           SUM_ROWS)}  # fmt: skip


@pytest.fixture(scope="module")
def base_scores(base):
    return scores(base)


def scores(model_path, adapter=None) -> list[float]:
    """Per-choice log-likelihoods (multiple choice) and bits per byte, through lm-eval."""
    run = evaluate(model_path, EVAL_TASKS, adapter=adapter, dtype="float32", limit=3, log_samples=True,
                   bootstrap_iters=0, device="cpu")  # fmt: skip
    choices = [float(resp[0][0]) for sample in run.samples["dsmoe_tiny_arc"] for resp in sample["resps"]]
    return choices + [run.results["results"]["dsmoe_tiny_pile"]["bits_per_byte,none"]]


def run(argv: list[str], capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def chat_logits(model, tokenizer) -> torch.Tensor:
    ids = chat_input_ids(tokenizer, [{"role": "user", "content": "Repeat: apple"}], model.device)
    with torch.no_grad():
        return model(ids).logits


def test_lora_with_default_targets_evaluates_merges_and_chats(base, data, base_scores, tmp_path, capsys):
    adapter = tmp_path / "lora"
    run_sft(*parse_sft_args(["--model_name_or_path", str(base), "--dataset_name", str(data["chat"]), "--output_dir",
                             str(adapter), "--use_peft", *TRAIN_FLAGS]))  # fmt: skip
    assert adapter_kind(adapter) == "lora"
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as weights:
        assert any("mlp.experts.lora_A" in name for name in weights.keys())  # the default targets reach the experts

    with_adapter = scores(base, adapter)
    assert with_adapter != pytest.approx(base_scores, abs=1e-4)
    merged = merge_adapter(base, adapter, tmp_path / "merged")
    assert scores(merged) == pytest.approx(with_adapter, abs=1e-4)

    reply = run(["chat", str(base), "--adapter", str(adapter), "--dtype", "float32", "--message", "Repeat: apple",
                 "--max_new_tokens", "4"], capsys)  # fmt: skip
    assert reply.strip()
    adapted, tokenizer = load_for_inference(base, adapter, dtype="float32")
    plain, _ = load_for_inference(merged, dtype="float32")
    torch.testing.assert_close(chat_logits(adapted, tokenizer), chat_logits(plain, tokenizer), atol=1e-4, rtol=1e-4)


@needs_bitsandbytes
def test_qlora_adapter_chats_on_the_4bit_base(base, data, tmp_path, capsys):
    from modeling_deepseekmoe.quantization import DeepseekMoEQuantizedExperts

    adapter = tmp_path / "qlora"
    run_sft(*parse_sft_args(["--model_name_or_path", str(base), "--dataset_name", str(data["chat"]), "--output_dir",
                             str(adapter), "--use_peft", "--load_in_4bit", *TRAIN_FLAGS]))  # fmt: skip
    model, tokenizer = load_for_inference(base, adapter, dtype="float32", load_in_4bit=True)
    quantized = model.get_base_model()
    assert quantized.is_loaded_in_4bit
    experts = quantized.model.layers[1].mlp.experts
    assert isinstance(experts.get_base_layer(), DeepseekMoEQuantizedExperts) and "default" in experts.lora_A
    without, _ = load_for_inference(base, dtype="float32", load_in_4bit=True)
    assert not torch.allclose(chat_logits(model, tokenizer), chat_logits(without, tokenizer), atol=1e-4)
    reply = run(["chat", str(base), "--adapter", str(adapter), "--load_in_4bit", "--dtype", "float32", "--message",
                 "Repeat: apple", "--max_new_tokens", "4"], capsys)  # fmt: skip
    assert reply.strip()


def test_esft_scores_selects_trains_evaluates_and_merges(base, data, base_scores, tmp_path, capsys):
    scores_file, experts_file, adapter = tmp_path / "scores.json", tmp_path / "experts.json", tmp_path / "esft"
    run(["esft", "score", "--model_name_or_path", str(base), "--dataset_name", str(data["sums"]), "--output_file",
         str(scores_file), "--num_sequences", "4", "--sequence_length", "32", "--dtype", "float32"], capsys)
    run(["esft", "select", "--scores_file", str(scores_file), "--output_file", str(experts_file),
         "--top_k_per_layer", "2"], capsys)  # fmt: skip
    selection = json.loads(experts_file.read_text())["experts"]
    assert {layer: len(ids) for layer, ids in selection.items()} == {"1": 2, "2": 2}
    run(["esft", "train", "--model_name_or_path", str(base), "--dataset_name", str(data["sums"]), "--expert_config",
         str(experts_file), "--output_dir", str(adapter), *TRAIN_FLAGS], capsys)  # fmt: skip
    assert adapter_kind(adapter) == "esft"

    with_adapter = scores(base, adapter)
    assert with_adapter != pytest.approx(base_scores, abs=1e-4)
    run(["esft", "merge", "--model_name_or_path", str(base), "--adapter_name_or_path", str(adapter),
         "--output_dir", str(tmp_path / "merged")], capsys)  # fmt: skip
    assert scores(tmp_path / "merged") == pytest.approx(with_adapter, abs=1e-4)


@needs_bitsandbytes
def test_routing_analysis_of_a_4bit_model_on_chat_data(base, data, tmp_path):
    model = load_model(base, dtype="float32", load_in_4bit=True).eval()
    tokenizer = load_tokenizer(base)
    samples = load_samples([data["chat"], data["sums"]], tokenizer=tokenizer)
    results = analyze(model, tokenizer, samples, tmp_path / "analysis", ablations=False, norm_tokens=8,
                      progress=False)  # fmt: skip
    routing = results["routing"]
    tokens = sum(len(tokenizer(sample.text)["input_ids"]) for sample in samples)
    assert routing["layers"] == [1, 2] and routing["tokens"] == [tokens, tokens]
    assert [sum(row) for row in routing["selections"]] == [tokens * 3, tokens * 3]  # top-3 of every token
    assert set(routing["domains"]) == {"chat", "sums"}
    assert all((tmp_path / "analysis" / name).is_file() for name in results["files"])


def test_a_trained_adapter_records_its_base_as_typed_absolute_and_a_true_card(base, data, tmp_path, monkeypatch):
    from deepseekmoe.model_cards.card import read_training_setup

    monkeypatch.chdir(base.parent)
    adapter = tmp_path / "lora"
    run_sft(*parse_sft_args(["--model_name_or_path", base.name, "--dataset_name", str(data["chat"]), "--output_dir",
                             str(adapter), "--use_peft", "--lora_r", "4", *TRAIN_FLAGS]))  # fmt: skip
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    setup = read_training_setup(adapter)
    assert setup.method == "LoRA" and setup.lora["r"] == 4 and setup.steps == 3 and setup.base_model == str(base)


LOADING_FLAGS = ("--adapter", "--dtype", "--load_in_4bit", "--load_in_8bit", "--bnb_4bit_quant_type",
                 "--use_bnb_nested_quant", "--bnb_4bit_compute_dtype")  # fmt: skip


def test_every_loading_command_takes_the_same_flags_and_analyze_reads_chat_rows(base, data, tmp_path, capsys):
    for command in (["chat"], ["generate"], ["eval"], ["analyze"], ["esft", "score"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        shown = capsys.readouterr().out
        missing = [flag for flag in LOADING_FLAGS if flag not in shown]
        assert not missing, (command, missing)
    run(["analyze", str(base), "--data", str(data["chat"]), "--output_dir", str(tmp_path / "analysis"), "--dtype",
         "float32", "--no_ablations", "--no_static", "--norm_tokens", "0"], capsys)  # fmt: skip
    assert json.loads((tmp_path / "analysis" / "analysis.json").read_text())["data"]["samples"] == len(CHAT_ROWS)
