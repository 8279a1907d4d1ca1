import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from deepseekmoe.cli import main
from deepseekmoe.finetune.esft.adapter import apply_esft_adapter
from deepseekmoe.finetune.esft.train import parse_esft_args, run_esft
from modeling_deepseekmoe.checkpoint import released_tensor_shapes

from test_sft import TOY_ROWS, TRAIN_FLAGS, write_base, write_jsonl


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("esft")
    return {"root": root, "base": write_base(root / "base"), "data": write_jsonl(root / "task.jsonl", TOY_ROWS)}


def test_score_select_train_merge_through_the_cli(workspace, capsys):
    root, base, data = workspace["root"], workspace["base"], workspace["data"]
    assert main(["esft", "score", "--model_name_or_path", str(base), "--dataset_name", str(data),
                 "--output_file", str(root / "scores.json"), "--num_sequences", "4", "--sequence_length", "32"]) == 0
    scores = json.loads((root / "scores.json").read_text())
    assert scores["num_tokens"] > 0 and sorted(scores["token"]) == ["1", "2"]
    assert main(["esft", "select", "--scores_file", str(root / "scores.json"), "--output_file",
                 str(root / "experts.json"), "--top_k_per_layer", "2"]) == 0
    config = json.loads((root / "experts.json").read_text())
    assert set(config) == {"experts", "shared_experts", "non_expert_modules"}
    assert all(len(ids) == 2 for ids in config["experts"].values())
    assert (root / "experts.png").stat().st_size > 1000

    adapter = root / "adapter"
    assert main(["esft", "train", "--model_name_or_path", str(base), "--dataset_name", str(data),
                 "--output_dir", str(adapter), "--expert_config", str(root / "experts.json"), "--max_steps", "3",
                 *TRAIN_FLAGS]) == 0
    stored = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "expert_config.json", "esft_adapter.json", "README.md"} <= stored
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in stored)
    assert "ESFT" in (adapter / "README.md").read_text()

    merged = root / "merged"
    assert main(["esft", "merge", "--model_name_or_path", str(base), "--adapter_name_or_path", str(adapter),
                 "--output_dir", str(merged)]) == 0
    base_model = AutoModelForCausalLM.from_pretrained(base)
    merged_model = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.randint(0, 500, (2, 10))
    adapted = apply_esft_adapter(AutoModelForCausalLM.from_pretrained(base), adapter)
    torch.testing.assert_close(merged_model(ids).logits, adapted(ids).logits, atol=0, rtol=0)
    before, after = base_model.state_dict(), merged_model.state_dict()
    for name, tensor in before.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            changed = (after[name] != tensor).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert changed == config["experts"][name.split(".")[2]], name
        else:
            assert torch.equal(after[name], tensor), name
    assert len(released_tensor_shapes(merged_model.config)) > 0


def test_esft_resume_continues_from_the_saved_adapter(workspace):
    root, base, data = workspace["root"], workspace["base"], workspace["data"]
    (root / "sel.json").write_text(json.dumps({"experts": {"1": [0, 3], "2": [5]}}))
    flags = ["--model_name_or_path", str(base), "--dataset_name", str(data), "--expert_config", str(root / "sel.json"),
             *TRAIN_FLAGS, "--save_strategy", "steps", "--save_steps", "2"]

    def run(output, steps, *extra):
        return run_esft(*parse_esft_args(flags + ["--output_dir", str(output), "--max_steps", str(steps), *extra]))

    full = run(root / "full", 4)
    run(root / "cut", 2)
    resumed = run(root / "cut", 4, "--resume_from_checkpoint", "true")
    losses = lambda result: [e["loss"] for e in result.trainer.state.log_history if "loss" in e]  # noqa: E731
    # The resumed run restores steps 1-2 from the checkpoint's state and continues the same curve.
    assert len(losses(full)) == 4
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-4)
    checkpoint = root / "cut" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()


def test_esft_refuses_a_dense_layer_before_training(workspace):
    root, base, data = workspace["root"], workspace["base"], workspace["data"]
    (root / "bad.json").write_text(json.dumps({"experts": {"0": [1]}}))
    argv = ["--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(root / "bad"),
            "--expert_config", str(root / "bad.json"), *TRAIN_FLAGS]
    with pytest.raises(ValueError, match="layer 0, which is a dense layer"):
        run_esft(*parse_esft_args(argv))
