"""The lm-eval integration (deepseekmoe.eval): registered model, library API, CLI, adapters, paper suite, reports.

Everything runs offline on a tiny model and the task files shipped in eval/tasks/.
"""

import argparse
import json
import math
import shutil

import pytest
import torch
import yaml

from deepseekmoe.eval import report, suite
from deepseekmoe.eval.cli import add_eval_parser
from deepseekmoe.eval.harness import DeepseekMoELM, evaluate
from deepseekmoe.eval.tasks import PAPER_DIR, SAMPLES_DIR
from deepseekmoe.eval.tasks.local import LocalDataError
from deepseekmoe.finetune.esft.adapter import save_esft_adapter
from lm_eval.api.instance import Instance
from modeling_deepseekmoe import DeepseekMoEForCausalLM
from modeling_deepseekmoe.tokenization import build_tokenizer

from conftest import tiny_config

ESFT_SELECTION = {"experts": {"1": [0, 1, 2, 3], "2": [4, 5, 6, 7]}, "shared_experts": False,
                  "non_expert_modules": False}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub access."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module", autouse=True)
def shared_task_index():
    """Every lm-eval TaskManager re-indexes lm-eval's ~15k task configs (seconds each); here the managers built by the
    tests and by the CLI under test share one index per list of directories (they only read it)."""
    from lm_eval.tasks._index import TaskIndex

    build, cache = TaskIndex.build, {}

    def cached_build(paths, **kwargs):
        key = (tuple(str(path) for path in paths), tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build(paths, **kwargs)
        return dict(cache[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskIndex, "build", staticmethod(cached_build))
        yield


def eval_config(tokenizer, **overrides):
    """An embedding padded past the tokenizer, as in the released checkpoints (102400 rows, 100015 tokens)."""
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return tiny_config(vocab_size=len(tokenizer) + 64, max_position_embeddings=256, **special, **overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny DeepSeekMoE checkpoint with its tokenizer, as from_pretrained / lm-eval load it."""
    directory = tmp_path_factory.mktemp("checkpoint")
    tokenizer = build_tokenizer(vocab_size=512, save_directory=directory)
    torch.manual_seed(0)
    DeepseekMoEForCausalLM(eval_config(tokenizer)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def load_model(checkpoint):
    return DeepseekMoEForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_run(checkpoint, tmp_path_factory):
    """The tiny suite (multiple choice, exact-match generation, bits per byte) through the library API."""
    output = tmp_path_factory.mktemp("base_run")
    return evaluate(checkpoint, "dsmoe_tiny", log_samples=True, output_path=output, bootstrap_iters=0, device="cpu")


@pytest.fixture(scope="module")
def lora_adapter(checkpoint, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_model(checkpoint), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    directory = tmp_path_factory.mktemp("lora")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def esft_adapter(checkpoint, tmp_path_factory):
    """An ESFT adapter whose experts differ from the base; returns (adapter dir, the fine-tuned model)."""
    tuned = load_model(checkpoint)
    torch.manual_seed(2)
    with torch.no_grad():
        for layer, experts in ESFT_SELECTION["experts"].items():
            fused = tuned.model.layers[int(layer)].mlp.experts
            for expert in experts:
                fused.gate_up_proj[expert] += 0.5 * torch.randn_like(fused.gate_up_proj[expert])
                fused.down_proj[expert] += 0.5 * torch.randn_like(fused.down_proj[expert])
    directory = tmp_path_factory.mktemp("esft") / "adapter"
    save_esft_adapter(tuned, ESFT_SELECTION, directory, base_model_name_or_path=str(checkpoint))
    return directory, tuned


@pytest.fixture(scope="module")
def task_manager():
    """lm-eval's TaskManager with its built-in tasks and the project's (indexing takes several seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=suite.include_paths())


# ---------------------------------------------------------------------- helpers
def bits_per_byte(run) -> float:
    return run.results["results"]["dsmoe_tiny_pile"]["bits_per_byte,none"]


def choice_loglikelihoods(samples: list[dict]) -> list[float]:
    return [float(resp[0][0]) for sample in samples for resp in sample["resps"]]


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval does (whole string, then split at the context)."""
    whole = tokenizer(context + continuation)["input_ids"]
    prefix = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(prefix, len(whole)))


def direct_bits_per_byte(model, tokenizer, texts: list[str]) -> float:
    """Bits per byte with each text scored after a single BOS."""
    total = 0.0
    for text in texts:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        total += sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids)))
    return -total / sum(len(text.encode("utf-8")) for text in texts) / math.log(2)


def assert_matches_model(samples: list[dict], model, tokenizer, docs: int = 3) -> None:
    for sample in samples[:docs]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            expected = direct_loglikelihood(model, tokenizer, context, continuation)
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-3)


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deepseekmoe")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)
    return args


# ---------------------------------------------------------------------- end to end
def test_library_api_writes_lm_eval_json_and_markdown(base_run):
    scores = base_run.results["results"]
    assert 0.0 <= scores["dsmoe_tiny_arc"]["acc,none"] <= 1.0
    assert 0.0 <= scores["dsmoe_tiny_qa"]["exact_match,remove_whitespace"] <= 1.0
    assert scores["dsmoe_tiny_pile"]["bits_per_byte,none"] > 0
    written = json.loads(base_run.results_file.read_text())
    assert written["results"]["dsmoe_tiny_arc"] == scores["dsmoe_tiny_arc"]
    assert written["config"]["model"] == "deepseekmoe"
    assert len(base_run.samples["dsmoe_tiny_qa"]) == 8
    table = base_run.markdown_file.read_text()
    assert table == base_run.markdown
    assert "| Task | Metric | Value | Stderr | Shots | Paper (DeepSeekMoE 16B) | Paper shots | Note |" in table
    assert f"| dsmoe_tiny_arc | acc,none | {100 * scores['dsmoe_tiny_arc']['acc,none']:.2f} |" in table


def test_loglikelihoods_match_the_model(base_run, checkpoint, tokenizer):
    assert_matches_model(base_run.samples["dsmoe_tiny_arc"], load_model(checkpoint), tokenizer)


def test_bits_per_byte_scores_each_text_after_one_bos(base_run, checkpoint, tokenizer):
    texts = [sample["doc"]["text"] for sample in base_run.samples["dsmoe_tiny_pile"]]
    expected = direct_bits_per_byte(load_model(checkpoint), tokenizer, texts)
    assert base_run.results["results"]["dsmoe_tiny_pile"]["bits_per_byte,none"] == pytest.approx(expected, rel=1e-4)


def test_cli_hands_lm_eval_flags_through_and_writes_the_model_card(checkpoint, tmp_path):
    model_dir = shutil.copytree(checkpoint, tmp_path / "model")
    output = tmp_path / "results"
    cli(["eval", "--pretrained", str(model_dir), "--tasks", "dsmoe_tiny_arc,dsmoe_tiny_qa", "--num_fewshot", "1",
         "--limit", "3", "--output_path", str(output), "--log_samples", "--batch_size", "auto", "--max_batch_size",
         "4", "--device", "cpu", "--model_card"])  # fmt: skip
    results_file = report.latest_results_file(output)
    results = json.loads(results_file.read_text())
    assert results["n-shot"] == {"dsmoe_tiny_arc": 1, "dsmoe_tiny_qa": 1}
    assert results["n-samples"]["dsmoe_tiny_arc"] == {"original": 8, "effective": 3}
    assert results["config"]["model_args"]["pretrained"] == str(model_dir)
    assert sorted(path.name.split("_2")[0] for path in results_file.parent.glob("samples_*.jsonl")) == [
        "samples_dsmoe_tiny_arc",
        "samples_dsmoe_tiny_qa",
    ]
    table = results_file.with_suffix(".md").read_text()
    assert "**limit=3.0**" in table and "| dsmoe_tiny_qa | exact_match,remove_whitespace |" in table
    card = (model_dir / "README.md").read_text()
    assert "## Evaluation\n" in card and "| dsmoe_tiny_arc | acc,none |" in card


# ---------------------------------------------------------------------- adapters
def test_lora_adapter_changes_the_scores(base_run, checkpoint, tokenizer, lora_adapter):
    from peft import PeftModel

    run = evaluate(checkpoint, ["dsmoe_tiny_arc", "dsmoe_tiny_pile"], peft=lora_adapter, log_samples=True,
                   bootstrap_iters=0, device="cpu")  # fmt: skip
    assert bits_per_byte(run) != pytest.approx(bits_per_byte(base_run))
    assert choice_loglikelihoods(run.samples["dsmoe_tiny_arc"]) != pytest.approx(
        choice_loglikelihoods(base_run.samples["dsmoe_tiny_arc"])
    )
    tuned = PeftModel.from_pretrained(load_model(checkpoint), str(lora_adapter)).eval()
    assert_matches_model(run.samples["dsmoe_tiny_arc"], tuned, tokenizer, docs=1)


def test_esft_adapter_changes_the_scores(base_run, checkpoint, tokenizer, esft_adapter):
    adapter, tuned = esft_adapter
    run = evaluate(checkpoint, ["dsmoe_tiny_arc", "dsmoe_tiny_pile"], esft=adapter, log_samples=True,
                   bootstrap_iters=0, device="cpu")  # fmt: skip
    assert bits_per_byte(run) != pytest.approx(bits_per_byte(base_run))
    assert choice_loglikelihoods(run.samples["dsmoe_tiny_arc"]) != pytest.approx(
        choice_loglikelihoods(base_run.samples["dsmoe_tiny_arc"])
    )
    assert_matches_model(run.samples["dsmoe_tiny_arc"], tuned, tokenizer, docs=1)
    assert run.results["config"]["model_args"]["esft"] == str(adapter)


def test_adapters_for_another_base_are_refused(checkpoint, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    other = DeepseekMoEForCausalLM(eval_config(tokenizer, n_routed_experts=4)).eval()
    save_esft_adapter(other, {"experts": {"1": [0]}}, tmp_path / "esft")
    with pytest.raises(ValueError, match="ESFT adapter .* does not match this base model .*n_routed_experts"):
        DeepseekMoELM(pretrained=str(checkpoint), esft=str(tmp_path / "esft"))

    wider = DeepseekMoEForCausalLM(eval_config(tokenizer, hidden_size=48)).eval()
    get_peft_model(wider, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="LoRA adapter .* does not match the base model"):
        DeepseekMoELM(pretrained=str(checkpoint), peft=str(tmp_path / "lora"))

    with pytest.raises(ValueError, match="either a LoRA adapter .* or an ESFT adapter"):
        DeepseekMoELM(pretrained=str(checkpoint), peft=str(tmp_path / "lora"), esft=str(tmp_path / "esft"))


def test_generation_never_produces_ids_past_the_tokenizer(checkpoint, tokenizer):
    lm = DeepseekMoELM(pretrained=str(checkpoint))
    assert lm.model.generation_config.suppress_tokens == list(range(len(tokenizer), len(tokenizer) + 64))
    prompt = torch.tensor([tokenizer("Question: hi\nAnswer:")["input_ids"]])
    generated = lm.model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert generated.shape[1] == prompt.shape[1] + 12 and int(generated.max()) < len(tokenizer)


def test_device_map_places_the_model(checkpoint):
    lm = DeepseekMoELM(pretrained=str(checkpoint), device_map="auto", dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16 and str(lm.device) == "cpu"
    [(logprob, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("Question: hi\nAnswer:", " yes"), 0)])
    assert math.isfinite(logprob) and lm.max_length == 256


def test_load_in_4bit_builds_a_bitsandbytes_config(checkpoint):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    lm = DeepseekMoELM(pretrained=str(checkpoint), load_in_4bit=True, dtype="float32")
    assert isinstance(lm.model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert lm.model.config.quantization_config.load_in_4bit


# ---------------------------------------------------------------------- paper suite
def test_paper_suite_tasks_exist_in_lm_eval(task_manager):
    mapping = suite.paper_mapping()["tasks"]
    missing = [task for task in mapping if task not in task_manager.all_tasks]
    assert not missing, f"mapped tasks unknown to lm-eval: {missing}"
    for group in suite.PAPER_GROUPS:
        assert group in task_manager.all_groups
        assert suite._resolves(task_manager, group, accept_tags=True), group
        assert set(suite._group_members(task_manager.task_index[group].cfg)) <= set(mapping)


def test_paper_groups_use_the_paper_shots():
    for group, model in suite.paper_mapping()["groups"].items():
        config = yaml.safe_load((PAPER_DIR / f"{group}.yaml").read_text())
        for member in config["task"]:
            task, shots = (member["task"], member["num_fewshot"]) if isinstance(member, dict) else (member, None)
            reference = suite.paper_reference(task, model)
            assert reference.value is not None, (group, task)
            if shots is not None and reference.comparable:
                assert shots == reference.shots, (group, task)


def test_every_paper_benchmark_has_a_task():
    mapped = {entry["benchmark"] for entry in suite.paper_mapping()["tasks"].values()}
    assert mapped == set(suite.paper_numbers()["benchmarks"])


def test_local_paper_tasks_run_on_the_sample_files(checkpoint):
    run = evaluate(checkpoint, "paper_base_local", data_dir=SAMPLES_DIR, limit=2, bootstrap_iters=0, device="cpu")
    scores = run.results["results"]
    for task in ("race_middle_local", "race_high_local", "cluewsc_local", "chid_local"):
        assert 0.0 <= scores[task]["acc,none"] <= 1.0
    assert scores["pile_bpb_local"]["bits_per_byte,none"] > 0
    assert run.results["n-shot"]["race_middle_local"] == 5
    assert "| race_middle_local | acc,none |" in run.markdown and "| 61.90 | 5 |" in run.markdown
    assert "| cluewsc_local | acc,none |" in run.markdown and "not comparable" in run.markdown


def test_chat_comparison_uses_the_chat_column():
    results = {"results": {"gsm8k_cot_zeroshot": {"exact_match,strict-match": 0.5}}, "n-shot": {}}
    rows = report.result_rows(results, paper_model="chat")
    assert rows[0].paper == 62.2 and rows[0].paper_shots == 0 and rows[0].value == 50.0


# ---------------------------------------------------------------------- bad input
def test_unknown_task_names_are_refused_with_suggestions(task_manager):
    with pytest.raises(suite.UnknownTaskError, match=r"'hellaswagg' \(did you mean hellaswag"):
        suite.check_task_names(task_manager, ["arc_easy", "hellaswagg"])
    with pytest.raises(FileNotFoundError, match="Task config file not found"):
        suite.check_task_names(task_manager, ["/no/such/task.yaml"])


def test_cli_refuses_unknown_tasks_and_missing_models(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="Tasks not found: hellaswagg.*paper_base"):
        cli(["eval", "--pretrained", str(checkpoint), "--tasks", "hellaswagg", "--device", "cpu"])
    with pytest.raises(ValueError, match="No model to evaluate: pass --pretrained"):
        cli(["eval", "--tasks", "dsmoe_tiny"])
    with pytest.raises(ValueError, match="--model_card needs --output_path"):
        cli(["eval", "--pretrained", str(checkpoint), "--tasks", "dsmoe_tiny", "--model_card"])
    with pytest.raises(ValueError, match="--esft is not available with --vllm|--vllm needs vLLM installed"):
        cli(["eval", "--pretrained", str(checkpoint), "--esft", str(tmp_path), "--vllm", "--tasks", "dsmoe_tiny"])


def test_library_api_refuses_unknown_tasks_before_loading_the_model(tmp_path):
    with pytest.raises(suite.UnknownTaskError, match=r"'hellaswagg' \(did you mean hellaswag"):
        evaluate(tmp_path / "no-model-here", ["dsmoe_tiny_arc", "hellaswagg"])


def test_missing_local_data_is_named(checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPSEEKMOE_EVAL_DATA", raising=False)
    with pytest.raises(LocalDataError, match=r"chid/test.jsonl .*A sample in the expected format"):
        evaluate(checkpoint, "chid_local", data_dir=tmp_path, bootstrap_iters=0, device="cpu")
    with pytest.raises(LocalDataError, match="no data directory is set"):
        evaluate(checkpoint, "chid_local", bootstrap_iters=0, device="cpu")


def test_model_card_evaluation_section_is_replaced_not_duplicated(base_run, tmp_path):
    (tmp_path / "README.md").write_text("# My model\n\n## Evaluation\n\nNot evaluated yet.\n")
    report.write_model_card(tmp_path, base_run.results)
    report.write_model_card(tmp_path, base_run.results)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# My model\n") and "Not evaluated yet" not in card
    assert card.count("## Evaluation") == 1 and card.count("| dsmoe_tiny_arc | acc,none |") == 1
