import json

from deepseekmoe.cli import main
from deepseekmoe.demo import format_demo, run_demo


def test_demo_saves_released_layout_reloads_generates_and_reports_routing(tmp_path):
    result = run_demo(tmp_path, max_new_tokens=4)
    assert (result.model_dir / "model.safetensors.index.json").is_file()
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek" and config["architectures"] == ["DeepseekForCausalLM"]
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in json.loads(
        (result.model_dir / "model.safetensors.index.json").read_text()
    )["weight_map"]
    assert len(result.routing) == result.prompt_tokens + 4
    for entry in result.routing:
        assert sorted(entry["experts"]) == [1, 2, 3]
        assert all(len(set(ids)) == 4 and max(ids) < 16 for ids in entry["experts"].values())
    assert "Routed experts" in format_demo(result)


def test_demo_is_reproducible(tmp_path):
    first = run_demo(tmp_path / "a", max_new_tokens=3)
    second = run_demo(tmp_path / "b", max_new_tokens=3)
    assert first.completion == second.completion and first.routing == second.routing


def test_cli_demo_runs(tmp_path, capsys):
    assert main(["demo", "--output_dir", str(tmp_path), "--max_new_tokens", "2"]) == 0
    assert "AutoModelForCausalLM" in capsys.readouterr().out
