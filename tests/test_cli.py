import json
import subprocess
import sys

import pytest

from deepseekmoe.cli import main

SUBCOMMANDS = [
    ["demo"], ["convert"], ["chat"], ["generate"], ["footprint"], ["sft"], ["merge"], ["esft"],
    ["esft", "score"], ["esft", "select"], ["esft", "train"], ["esft", "merge"], ["eval"], ["analyze"], ["env"],
]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.fixture
def llama_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    return tmp_path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_path_is_a_one_line_error(capsys, tmp_path):
    assert main(["chat", str(tmp_path / "missing"), "--message", "hi"]) == 1
    assert "No checkpoint at" in one_line_error(capsys)
    assert main(["convert", str(tmp_path / "missing")]) == 1
    assert "has no config.json" in one_line_error(capsys)


def test_wrong_model_type_is_a_one_line_error(capsys, llama_dir):
    assert main(["convert", str(llama_dir)]) == 1
    assert "model_type 'llama'" in one_line_error(capsys)


def test_unknown_task_is_a_one_line_error(capsys, released_checkpoint):
    assert main(["eval", "--pretrained", str(released_checkpoint), "--tasks", "no_such_task_xyz"]) != 0
    assert "no_such_task_xyz" in capsys.readouterr().err


def test_esft_select_without_scores_is_a_one_line_error(capsys, tmp_path):
    assert main(["esft", "select", "--scores_file", str(tmp_path / "none.json"), "--output_file",
                 str(tmp_path / "out.json")]) == 1
    one_line_error(capsys)


def test_the_installed_command_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deepseekmoe.cli", "convert", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "has no config.json" in result.stderr


def test_env_reports_versions_cpu_and_kernel_paths(capsys):
    import torch
    import transformers

    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transformers"] == transformers.__version__
    assert report["torch"].startswith(torch.__version__.split("+")[0])
    for key in ("python", "peft", "trl", "accelerate", "bitsandbytes", "lm_eval", "cpu capability (torch)",
                "cpu bf16 matmul", "gpu", "experts implementation"):
        assert report[key], key
    assert main(["env"]) == 0
    assert f"- transformers: {transformers.__version__}" in capsys.readouterr().out
