"""Outputs that cannot lose work or lie (issue 18 items 2-4, 10, 11): one checkpoint writer (staged, validated,
renamed, normal permissions, "disk full at ..."), output folders owned by one run, no output over an input, and data
errors that name the line."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from deepseekmoe.cli import main
from deepseekmoe.convert import convert_checkpoint
from deepseekmoe.finetune.data import DatasetValidationError, prepare_sft_dataset
from deepseekmoe.finetune.merge import merge_adapter
from deepseekmoe.finetune.run_folder import RUN_INFO_FILE
from deepseekmoe.finetune.sft import parse_sft_args, run_sft
from modeling_deepseekmoe import DeepseekMoEForCausalLM, checkpoint_writer
from modeling_deepseekmoe.checkpoint_writer import DiskFullError

from conftest import write_tiny_checkpoint
from test_sft import TOY_ROWS, TRAIN_FLAGS, InterruptAt, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny released-layout checkpoint (several shards) with a tokenizer and the chat template."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "base", max_shard_bytes=60_000)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", TOY_ROWS)


def listing(directory: Path) -> dict[str, int]:
    """Every file under `directory` with its size: what "left untouched" is checked against."""
    return {str(path.relative_to(directory)): path.stat().st_size for path in sorted(directory.rglob("*"))
            if path.is_file()}  # fmt: skip


def modes(directory: Path) -> set[int]:
    return {path.stat().st_mode & 0o777 for path in [directory, *directory.rglob("*")]}


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# --------------------------------------------------------------------------------------------------------------------
# The checkpoint writer


def test_writer_gives_outputs_the_permissions_of_the_umask(base, tmp_path, umask_022):
    model = DeepseekMoEForCausalLM.from_pretrained(base)
    output = checkpoint_writer.save_checkpoint(model, tmp_path / "saved", max_shard_size="100KB")
    files = [path for path in output.iterdir() if path.is_file()]
    assert len([path for path in files if path.suffix == ".safetensors"]) > 1
    assert {path.stat().st_mode & 0o777 for path in files} == {0o644}  # safetensors alone writes 0600
    assert output.stat().st_mode & 0o777 == 0o755
    os.umask(0o027)
    private = checkpoint_writer.save_checkpoint(model, tmp_path / "group", max_shard_size="100KB")
    assert modes(private) == {0o750, 0o640}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["group", "saved"]  # no staging folder left


def test_writer_leaves_the_destination_as_it_was_when_a_write_fails(base, tmp_path):
    model = DeepseekMoEForCausalLM.from_pretrained(base)
    destination = checkpoint_writer.save_checkpoint(model, tmp_path / "out", max_shard_size="100KB")
    before = listing(destination)

    def fail(staging):
        assert (staging / "config.json").is_file()
        raise RuntimeError("interrupted after the weights")

    with pytest.raises(RuntimeError, match="interrupted"):
        checkpoint_writer.save_checkpoint(model, destination, overwrite=True, finalize=fail)
    assert listing(destination) == before
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        checkpoint_writer.save_checkpoint(model, destination)
    with pytest.raises(RuntimeError):
        checkpoint_writer.save_checkpoint(model, tmp_path / "new", finalize=fail)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def no_space_after_config(self, save_directory, **kwargs):
    """`save_pretrained` on a disk that fills up after config.json, failing as safetensors reports it."""
    self.config.save_pretrained(save_directory)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_is_named_and_leaves_nothing_that_looks_complete(base, tmp_path, monkeypatch):
    model = DeepseekMoEForCausalLM.from_pretrained(base)
    monkeypatch.setattr(DeepseekMoEForCausalLM, "save_pretrained", no_space_after_config)
    with pytest.raises(DiskFullError, match=f"disk full at {tmp_path / 'out'}"):
        checkpoint_writer.save_checkpoint(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

    def torch_style_failure(self, save_directory, **kwargs):  # torch.save's message does not say why
        (Path(save_directory) / "config.json").write_text("{}")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(DeepseekMoEForCausalLM, "save_pretrained", torch_style_failure)
    monkeypatch.setattr(checkpoint_writer, "free_bytes", lambda path: 4096)
    with pytest.raises(DiskFullError):
        checkpoint_writer.save_checkpoint(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(checkpoint_writer, "free_bytes", lambda path: 10**12)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space left it is not a full disk
        checkpoint_writer.save_checkpoint(model, tmp_path / "out")


def test_a_deleted_folder_is_never_left_half_deleted_under_its_name(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "model.safetensors").write_text("x")
    (folder / "trainer_state.json").write_text("{}")
    calls = []

    def interrupted_rmtree(path, *args, **kwargs):
        calls.append(Path(path).name)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_writer.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_writer.remove_directory(folder)
    assert not folder.exists() and calls == [".checkpoint-4.replaced"]


def test_shard_sizes_are_checked_before_anything_is_written():
    assert checkpoint_writer.parse_shard_size("5GB") == 5 * 10**9
    assert checkpoint_writer.parse_shard_size("2GiB") == 2 * 2**30
    assert checkpoint_writer.parse_shard_size(1000) == 1000
    for bad in ("5XB", "-1GB", "0", "lots"):
        with pytest.raises(ValueError, match="--max_shard_size"):
            checkpoint_writer.parse_shard_size(bad)


# --------------------------------------------------------------------------------------------------------------------
# convert and merge: staged, and never over an input


def test_convert_stages_its_output_and_refuses_a_bad_shard_size_before_writing(base, tmp_path, capsys):
    assert main(["convert", str(base), "--output_dir", str(tmp_path / "new"), "--max_shard_size", "5XB"]) == 1
    assert "--max_shard_size '5XB' is not a size" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no config files left behind: the re-run is not refused as "not empty"
    assert main(["convert", str(base), "--output_dir", str(tmp_path / "new"), "--max_shard_size", "100KB"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(tmp_path / "new")
    assert (tmp_path / "new" / "tokenizer.json").is_file() and sorted(os.listdir(tmp_path)) == ["new"]
    assert main(["convert", str(base), "--output_dir", str(tmp_path / "new")]) == 1
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(base), "--output_dir", str(tmp_path / "new"), "--overwrite"]) == 0


def test_convert_killed_mid_write_leaves_no_output(base, tmp_path):
    """kill -9 after the second shard: the destination does not exist (a hidden staging folder does, and the next
    convert to the same destination removes it)."""
    script = f"""
import os, signal, safetensors.torch, transformers.modeling_utils as modeling_utils
from deepseekmoe.convert import convert_checkpoint
original, written = modeling_utils.safe_save_file, []
def save_then_die(*args, **kwargs):
    original(*args, **kwargs)
    written.append(1)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
modeling_utils.safe_save_file = save_then_die
convert_checkpoint({str(base)!r}, {str(tmp_path / 'out')!r}, max_shard_size="60KB")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not (tmp_path / "out").exists()
    assert [path.name for path in tmp_path.iterdir()] == [".out.staging"]
    convert_checkpoint(base, tmp_path / "out", max_shard_size="60KB")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_convert_never_writes_into_or_over_its_source(base, tmp_path):
    before = listing(base)
    with pytest.raises(ValueError, match="is the source checkpoint"):
        convert_checkpoint(base, base, overwrite=True)
    with pytest.raises(ValueError, match="inside the source checkpoint"):
        convert_checkpoint(base, base / "copy")
    with pytest.raises(ValueError, match="holds the source checkpoint"):
        convert_checkpoint(base, base.parent, overwrite=True)
    assert listing(base) == before


@pytest.fixture(scope="module")
def lora_adapter(base, tmp_path_factory):
    from peft import get_peft_model

    from deepseekmoe.finetune.lora import build_lora_config

    model = get_peft_model(DeepseekMoEForCausalLM.from_pretrained(base), build_lora_config(["attention"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    adapter = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(adapter)
    return adapter


def test_merge_overwrite_refuses_its_inputs_and_writes_readable_files(base, lora_adapter, tmp_path, capsys,
                                                                        umask_022):
    inputs = {"base": listing(base), "adapter": listing(lora_adapter)}
    for target, what in ((base, "is the base model"), (lora_adapter, "is the adapter"),
                         (base.parent, "holds the base model")):  # fmt: skip
        assert main(["merge", "--model_name_or_path", str(base), "--adapter_name_or_path", str(lora_adapter),
                     "--output_dir", str(target), "--overwrite"]) == 1  # fmt: skip
        assert what in capsys.readouterr().err
    assert {"base": listing(base), "adapter": listing(lora_adapter)} == inputs

    merged = merge_adapter(base, lora_adapter, tmp_path / "merged", max_shard_size="100KB")
    assert modes(merged) == {0o755, 0o644}  # readable by other users (the staging folder was 0700 before)
    card = (merged / "README.md").read_text()
    assert str(merged.absolute()) in card and ".staging" not in card  # the loading snippet names the final folder
    assert sorted(os.listdir(tmp_path)) == ["merged"]


# --------------------------------------------------------------------------------------------------------------------
# Output folders belong to one run


def sft(base, data, output, *flags):
    argv = ["--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(output)]
    return run_sft(*parse_sft_args(argv + TRAIN_FLAGS + list(flags)))


def steps(result) -> list[int]:
    return [entry["step"] for entry in result.trainer.state.log_history if "loss" in entry]


SAVE_EVERY_STEP = ["--save_strategy", "steps", "--save_steps", "1"]


def test_a_finished_run_is_not_trained_again(base, data, tmp_path, capsys):
    output = tmp_path / "run"
    sft(base, data, output, "--max_steps", "2", *SAVE_EVERY_STEP)
    info = json.loads((output / RUN_INFO_FILE).read_text())
    assert (info["status"], info["global_step"], info["identity"]["dataset_name"]) == ("finished", 2, str(data))
    final = listing(output)

    # Resumed with the same flags: a no-op with a message, the final model untouched, no step 3.
    argv = ["sft", "--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(output),
            *TRAIN_FLAGS, "--max_steps", "2", *SAVE_EVERY_STEP]  # fmt: skip
    assert main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert "already finished at step 2" in capsys.readouterr().out
    assert listing(output) == final
    result = sft(base, data, output, "--max_steps", "2", "--resume_from_checkpoint", str(output / "checkpoint-2"))
    assert result.skipped and result.trainer is None and listing(output) == final

    # Started again without saying what to do with it: refused, with both fixes named.
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "finished at step 2" in error and "--overwrite_output_dir" in error and len(error.splitlines()) == 1
    assert listing(output) == final

    # Asked to train further: continues from its last checkpoint.
    result = sft(base, data, output, "--max_steps", "3", *SAVE_EVERY_STEP, "--resume_from_checkpoint", "true")
    assert steps(result)[-1] == 3 and (result.summary["steps"], result.summary["global_step"]) == (1, 3)
    assert json.loads((output / RUN_INFO_FILE).read_text())["global_step"] == 3


def test_a_folder_of_another_run_is_refused_and_never_resumed(base, data, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # an unfinished run: checkpoint-1 (step 2 interrupted), no final model
        run_sft(*parse_sft_args(["--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir",
                                 str(output), *TRAIN_FLAGS, "--max_steps", "3", *SAVE_EVERY_STEP]),
                callbacks=[InterruptAt(2)])  # fmt: skip
    other_data = write_jsonl(tmp_path / "other.jsonl", TOY_ROWS[:4])
    before = listing(output)
    with pytest.raises(ValueError, match="holds 1 checkpoint.* of another run .*dataset_name"):
        sft(base, other_data, output, "--max_steps", "3", *SAVE_EVERY_STEP)
    with pytest.raises(ValueError, match="would resume another run"):
        sft(base, other_data, output, "--max_steps", "3", "--resume_from_checkpoint", "true")
    with pytest.raises(ValueError, match="unfinished.*--resume_from_checkpoint true to continue"):
        sft(base, data, output, "--max_steps", "3", *SAVE_EVERY_STEP)
    (output / RUN_INFO_FILE).unlink()  # checkpoints whose run is unknown
    with pytest.raises(ValueError, match="unknown origin.*checkpoint-N"):
        sft(base, data, output, "--max_steps", "3", "--resume_from_checkpoint", "true")
    assert listing(output) == {name: size for name, size in before.items() if name != RUN_INFO_FILE}

    # --overwrite_output_dir deletes the earlier run's outputs, never an input kept there, other files stay.
    kept_data = write_jsonl(output / "kept.jsonl", TOY_ROWS)
    (output / "notes.txt").write_text("mine")
    result = sft(base, kept_data, output, "--max_steps", "1", *SAVE_EVERY_STEP, "--overwrite_output_dir", "true")
    assert steps(result) == [1]  # a fresh run: no history of the deleted one
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (output / "kept.jsonl").is_file() and (output / "notes.txt").read_text() == "mine"
    assert json.loads((output / RUN_INFO_FILE).read_text())["identity"]["dataset_name"] == str(kept_data)


def test_a_run_never_writes_over_its_model_or_data(base, data, tmp_path):
    before = listing(base)
    with pytest.raises(ValueError, match="is the model"):
        sft(base, data, base, "--max_steps", "1", "--overwrite_output_dir", "true")
    assert listing(base) == before


def test_a_full_disk_at_the_final_save_leaves_no_final_model(base, data, tmp_path, monkeypatch):
    original = DeepseekMoEForCausalLM.save_pretrained

    def full_at_final_save(self, save_directory, **kwargs):
        if Path(save_directory).name == ".staging-final":
            return no_space_after_config(self, save_directory, **kwargs)
        return original(self, save_directory, **kwargs)

    monkeypatch.setattr(DeepseekMoEForCausalLM, "save_pretrained", full_at_final_save)
    output = tmp_path / "run"
    with pytest.raises(DiskFullError, match=f"disk full at {output}"):
        sft(base, data, output, "--max_steps", "1")
    assert not [name for name in os.listdir(output) if name in ("config.json", "model.safetensors")
                or name.startswith(".staging")]  # fmt: skip
    assert json.loads((output / RUN_INFO_FILE).read_text())["status"] == "running"


# --------------------------------------------------------------------------------------------------------------------
# Data messages


DATA_FILES = {
    "invalid JSON line": (b'{"text": "a"}\n{"text": "b"}\n\n{"text": "c" oops}\n{"text": "d"}\n',
                          "rows.jsonl line 4 (row 2) is not valid JSON (Expecting ',' delimiter at column 14)"),
    "not UTF-8": (b'{"text": "a"}\n{"text": "b\xff\xfe"}\n', "rows.jsonl row 1: holds bytes that are not UTF-8"),
    "not UTF-8 (CSV)": (b"text\nhello\nbad\xffx\n", "rows.csv line 3 (row 1): byte 0xff at column 4 is not UTF-8"),
    "a number as text": (b'{"text": "a"}\n{"text": 5}\n', "Row 1: field 'text' is an int, expected text"),
    "a number as completion": (b'{"prompt": "2 + 2 =", "completion": 4}\n',
                               "Row 0: field 'completion' is an int while 'prompt' is text"),
    "empty answer": (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}\n',
                     "Row 0: messages[1] is an assistant turn with empty content"),
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


@pytest.mark.parametrize("case", list(DATA_FILES))
def test_data_errors_name_the_line_and_the_problem(case, tokenizer, tmp_path):
    content, message = DATA_FILES[case]
    path = tmp_path / ("rows.csv" if "CSV" in case else "rows.jsonl")
    path.write_bytes(content)
    with pytest.raises(DatasetValidationError) as error:
        prepare_sft_dataset(path, tokenizer)
    assert message in str(error.value)


def test_esft_train_output_folders_belong_to_one_selection(base, data, tmp_path):
    from deepseekmoe.finetune.esft.train import parse_esft_args, run_esft

    selection = tmp_path / "experts.json"
    selection.write_text(json.dumps({"experts": {"1": [0, 3], "2": [5]}}))

    def esft(*flags):
        return run_esft(*parse_esft_args(["--model_name_or_path", str(base), "--dataset_name", str(data),
                                          "--expert_config", str(selection), "--output_dir", str(tmp_path / "esft"),
                                          *TRAIN_FLAGS, "--max_steps", "1", *flags]))  # fmt: skip

    esft()
    adapter = listing(tmp_path / "esft")
    assert esft("--resume_from_checkpoint", "true").skipped
    selection.write_text(json.dumps({"experts": {"1": [1], "2": [5]}}))  # another selection: another run
    with pytest.raises(ValueError, match="would resume another run.*method"):
        esft("--resume_from_checkpoint", "true", "--max_steps", "2")
    assert listing(tmp_path / "esft") == adapter


def test_a_config_without_model_type_never_runs_the_checkpoints_code(tmp_path, capsys, monkeypatch):
    """Issue 18 item 8: transformers would offer to run `configuration_deepseek.py`; every loading command refuses
    with one line instead, whatever is typed at a prompt."""
    checkpoint = tmp_path / "planted"
    checkpoint.mkdir()
    marker = tmp_path / "planted-code-ran"
    (checkpoint / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekForCausalLM"], "hidden_size": 32,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
    }))
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        (checkpoint / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    for argv in (["generate", str(checkpoint), "--prompt", "hi"], ["chat", str(checkpoint), "--message", "hi"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "model_type None, not 'deepseek'" in err, err
    assert not marker.exists()
