import json

import pytest
import torch
from deepseekmoe.cli import main
from deepseekmoe.demo import ESFT_DOMAIN, ESFT_EXAMPLE, ESFT_PAIRS, FAST_SETTINGS, format_demo, run_demo
from deepseekmoe.finetune.synthetic import make_corpus, pretrain

from modeling_deepseekmoe.checkpoint import validate_checkpoint
from modeling_deepseekmoe.tokenization import build_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), fast=True)


def test_demo_writes_every_stage(demo):
    from modeling_deepseekmoe import DeepseekMoEConfig

    for directory in (demo.base_dir, demo.sft_dir, demo.esft_merged_dir):
        validate_checkpoint(directory, DeepseekMoEConfig.from_pretrained(directory))
        assert json.loads((directory / "config.json").read_text())["architectures"] == ["DeepseekForCausalLM"]
    assert (demo.esft_adapter_dir / "adapter_model.safetensors").is_file()
    assert all(path.is_file() and path.stat().st_size > 1000 for path in demo.plots)
    assert all(path.is_file() for path in demo.model_cards)
    assert "## Evaluation" in (demo.base_dir / "README.md").read_text()
    assert set(demo.exact_match) == {"base", "sft", "esft"}
    assert demo.routing and all(len(ids) == 2 for ids in demo.routing[0]["experts"].values())


def test_demo_esft_lowers_the_target_domain_loss(demo):
    assert demo.chat_losses["esft"][ESFT_DOMAIN] < demo.chat_losses["sft"][ESFT_DOMAIN]


def test_demo_shows_the_esft_task_before_and_after(demo):
    # The ESFT step's task is a table the experts must store (a new operator): its answers are scored before (SFT
    # model) and after ESFT, and the example prompt is printed with both answers.
    assert ESFT_EXAMPLE in {prompt for prompt, _ in ESFT_PAIRS}
    assert set(demo.esft_task_exact_match) == {"sft", "esft"}
    assert all(0 <= value <= 1 for value in demo.esft_task_exact_match.values())
    assert demo.prompt == ESFT_EXAMPLE
    text = format_demo(demo)
    assert f"User: {ESFT_EXAMPLE!r} -> SFT model (before ESFT): {demo.completion_before!r}" in text
    assert f"greedy answers right: sft {100 * demo.esft_task_exact_match['sft']:.0f}%" in text


def test_demo_pretraining_is_reproducible():
    tokenizer = build_tokenizer(vocab_size=512)
    corpus = make_corpus(20, seed=0)
    first, losses_a = pretrain(tokenizer, corpus, steps=3, seed=0, show_progress=False)
    second, losses_b = pretrain(tokenizer, corpus, steps=3, seed=0, show_progress=False)
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert FAST_SETTINGS.pretrain_steps < 200


def test_cli_demo_help_and_bad_output_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0 and "--fast" in capsys.readouterr().out
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["demo", "--output_dir", str(blocker), "--fast"]) == 1
    assert "error" in capsys.readouterr().err
