import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from deepseekmoe.cli import main
from modeling_deepseekmoe.checkpoint import write_random_released_checkpoint

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


# --------------------------------------------------------------------------------------------------------------------
# Every failure is one line naming the problem (issue 18, item 9)


def error_line(capsys) -> str:
    """The error line of a failed command: the last line on stderr, with no traceback anywhere."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("argv", [
    ["sft", "--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--max_steps", "abc"],
    ["sft", "--dataset_name", "d.jsonl"],
    ["sft", "--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--no_such_flag", "1"],
    ["esft", "train", "--model_name_or_path", "m", "--dataset_name", "d.jsonl"],
    ["eval", "--limit", "abc"],
    ["convert"],
], ids=["sft bad value", "sft missing flag", "sft unknown flag", "esft train missing flag", "eval bad value",
        "convert missing argument"])  # fmt: skip
def test_argument_errors_print_a_one_line_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("usage: deepseekmoe ") and "--help" in err[0], err
    assert "error:" in err[1]


def test_a_missing_model_path_is_named_as_missing(capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    missing = tmp_path / "no_model"
    assert main(["sft", "--model_name_or_path", str(missing), "--dataset_name", str(data), "--output_dir",
                 str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]) == 1  # fmt: skip
    line = error_line(capsys)
    assert f"--model_name_or_path {missing}: no such local directory" in line and "Repo id" not in line
    assert main(["eval", "--pretrained", str(missing), "--tasks", "dsmoe_tiny"]) == 1
    assert f"--pretrained {missing}: no such directory" in error_line(capsys)


def test_a_corrupt_shard_is_named(capsys, released_checkpoint):
    shard = sorted(released_checkpoint.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-50])  # truncated download
    for argv in (["convert", str(released_checkpoint)], ["generate", str(released_checkpoint), "--prompt", "hi"]):
        assert main(argv) == 1
        line = error_line(capsys)
        assert shard.name in line and "file not fully covered" in line and "download" in line, line


def test_a_refused_pickle_is_named_and_never_runs(capsys, tmp_path, config):
    directory = write_random_released_checkpoint(config, tmp_path / "bin", dtype=torch.float32,
                                                 max_shard_bytes=60_000, weight_format="bin")  # fmt: skip
    shard = sorted(directory.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    state["planted"] = PlantedCode(tmp_path / "ran")
    torch.save(state, shard)
    assert main(["convert", str(directory)]) == 1
    line = error_line(capsys)
    assert f"{shard.name} was refused: it holds pickled objects other than tensors" in line, line
    assert not (tmp_path / "ran").exists()


class PlantedCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_config_errors_full_disks_and_diverged_runs_are_one_line(capsys, tmp_path, released_checkpoint,
                                                                  monkeypatch):
    config_path = released_checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_experts_per_tok": config["n_routed_experts"] + 1}))
    assert main(["convert", str(released_checkpoint)]) == 1
    assert "num_experts_per_tok" in one_line_error(capsys)

    import deepseekmoe.convert
    from deepseekmoe.finetune import sft
    from deepseekmoe.finetune.callbacks import TrainingDivergedError

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(deepseekmoe.convert, "convert_checkpoint", no_space)
    assert main(["convert", str(released_checkpoint), "--output_dir", str(tmp_path / "out")]) == 1
    assert one_line_error(capsys).startswith(f"deepseekmoe convert: error: disk full at {tmp_path / 'out'}")

    def diverged(*args, **kwargs):
        raise TrainingDivergedError("The training loss is NaN/inf at step 3 (divergence); checkpoint-2 is intact.\n"
                                    "Lower --learning_rate.")

    monkeypatch.setattr(sft, "run_sft", diverged)
    monkeypatch.setattr(sft, "parse_sft_args", lambda *args, **kwargs: ())
    assert main(["sft"]) == 1
    assert "NaN/inf at step 3 (divergence); checkpoint-2 is intact. Lower --learning_rate." in one_line_error(capsys)


def test_unexpected_errors_are_one_line_unless_debug(capsys, monkeypatch):
    import deepseekmoe.footprint

    def bug(*args, **kwargs):
        raise KeyError("n_layers")

    monkeypatch.setattr(deepseekmoe.footprint, "load_config", bug)
    assert main(["footprint"]) == 1
    line = one_line_error(capsys)
    assert "unexpected KeyError: 'n_layers'" in line and "--debug" in line
    for argv in (["--debug", "footprint"], ["footprint", "--debug"]):
        with pytest.raises(KeyError):
            main(argv)
