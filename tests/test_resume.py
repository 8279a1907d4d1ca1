"""Resume, best-model loading, non-finite weights and checkpoint rotation of SFT / ESFT runs, on a tiny model on CPU.

Every mode (full fine-tuning, LoRA on attention and routed experts, QLoRA, ESFT) is interrupted after step 3 of 4
(checkpoint-2 saved), resumed, and must start from exactly the weights of step 2 and continue the uninterrupted
loss curve.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from deepseekmoe.cli import main
from deepseekmoe.finetune.callbacks import TrainingDivergedError
from deepseekmoe.finetune.esft.train import parse_esft_args, run_esft
from deepseekmoe.model_cards.card import ESFT, LORA, read_training_setup
from modeling_deepseekmoe.checkpoint import checkpoint_tensor_files

from test_sft import TOY_ROWS, TRAIN_FLAGS, InterruptAt, losses, qlora_skip_reason, write_base, write_jsonl


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    experts = root / "experts.json"
    experts.write_text(json.dumps({"experts": {"1": [0, 3], "2": [5]}, "shared_experts": False,
                                   "non_expert_modules": False}))
    return {"base": write_base(root / "base"), "data": write_jsonl(root / "train.jsonl", TOY_ROWS), "experts": experts}


class Snapshots(TrainerCallback):
    """The trained model's parameters at the start of training (after any resume) and after chosen steps."""

    def __init__(self, steps=()):
        self.steps, self.at_step, self.at_start = set(steps), {}, None

    @staticmethod
    def _copy(model):
        return {name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in model.named_parameters()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_start = self._copy(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.at_step[state.global_step] = self._copy(model)


MODES = {
    "full": [],
    "lora": ["--use_peft", "--lora_target_modules", "attention", "experts"],
    "qlora": ["--use_peft", "--load_in_4bit", "--lora_target_modules", "attention", "experts"],
    "esft": ["esft"],
}
COMMON = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "3e-3"]


def run(mode, workspace, output, *flags, callbacks=None):
    argv = ["--model_name_or_path", str(workspace["base"]), "--dataset_name", str(workspace["data"]),
            "--output_dir", str(output), *TRAIN_FLAGS, *COMMON, *flags]
    if mode == "esft":
        return run_esft(*parse_esft_args(argv + ["--expert_config", str(workspace["experts"])]), callbacks=callbacks)
    from deepseekmoe.finetune.sft import parse_sft_args, run_sft

    return run_sft(*parse_sft_args(argv + MODES[mode]), callbacks=callbacks)


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_restores_every_weight_and_continues_the_loss_curve(mode, workspace, tmp_path):
    if mode == "qlora" and qlora_skip_reason(("experts",)):
        pytest.skip(qlora_skip_reason(("experts",)))
    uninterrupted = losses(run(mode, workspace, tmp_path / "a").trainer)

    output, saved = tmp_path / "b", Snapshots(steps=[2])
    with pytest.raises(KeyboardInterrupt):
        run(mode, workspace, output, callbacks=[saved, InterruptAt(3)])
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]

    resumed_at = Snapshots()
    resumed = run(mode, workspace, output, "--resume_from_checkpoint", "true", callbacks=[resumed_at])
    step_2, start = saved.at_step[2], resumed_at.at_start
    assert start.keys() == step_2.keys()
    differing = [name for name in step_2 if start[name].dtype != step_2[name].dtype
                 or start[name].requires_grad != step_2[name].requires_grad
                 or not torch.equal(start[name], step_2[name])]
    assert not differing, f"not restored from checkpoint-2: {differing}"
    if mode == "full":  # the routed experts were trained, so a resume that skipped them would be caught above
        assert not torch.equal(step_2["model.layers.1.mlp.experts.gate_up_proj"], saved_start_experts(workspace))
    assert [e["step"] for e in resumed.trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]
    torch.testing.assert_close(losses(resumed.trainer), uninterrupted, rtol=1e-5, atol=1e-6)


def saved_start_experts(workspace):
    from modeling_deepseekmoe import DeepseekMoEForCausalLM

    return DeepseekMoEForCausalLM.from_pretrained(workspace["base"]).model.layers[1].mlp.experts.gate_up_proj


class RecordEval(TrainerCallback):
    """Fake eval losses: step 2 is the best, so the best model is checkpoint-2, not the last step."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_loss"] = {2: 0.1}.get(state.global_step, 1.0)


@pytest.mark.parametrize("mode", ["full", "esft"])
def test_load_best_model_at_end_restores_every_weight_of_the_best_checkpoint(mode, workspace, tmp_path):
    snapshots, record = Snapshots(steps=[2]), RecordEval()
    result = run(mode, workspace, tmp_path / "best", "--eval_strategy", "steps", "--eval_steps", "2",
                 "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss",
                 "--eval_dataset_name", str(workspace["data"]), callbacks=[snapshots, record])
    assert result.trainer.state.best_model_checkpoint == str(tmp_path / "best" / "checkpoint-2")
    final = {name: p.detach() for name, p in result.trainer.model.named_parameters()}
    differing = [name for name, value in snapshots.at_step[2].items() if not torch.equal(final[name], value)]
    assert not differing, f"not loaded from the best checkpoint: {differing}"


@pytest.mark.parametrize("mode", ["lora", "esft"])
def test_an_interrupted_run_leaves_no_card_and_the_finished_run_its_own(mode, workspace, tmp_path):
    output = tmp_path / "card"
    with pytest.raises(KeyboardInterrupt):
        run(mode, workspace, output, "--save_steps", "1", callbacks=[InterruptAt(3)])
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not list(output.rglob("README.md")), "TRL's / PEFT's generic card was written"
    run(mode, workspace, output, "--save_steps", "1", "--resume_from_checkpoint", "true")
    assert list(output.rglob("README.md")) == [output / "README.md"]
    setup = read_training_setup(output)
    assert (setup.method, setup.steps, setup.base_model) == ({"lora": LORA, "esft": ESFT}[mode], 4,
                                                              str(workspace["base"].absolute()))  # fmt: skip


BEST_FLAGS = ["--eval_strategy", "steps", "--eval_steps", "2", "--load_best_model_at_end", "true",
              "--metric_for_best_model", "eval_loss", "--max_steps", "6", "--save_total_limit", "2"]


def test_the_best_checkpoint_is_recorded_under_its_final_name_and_a_resume_loads_it(workspace, tmp_path):
    output, snapshots = tmp_path / "best_resumed", Snapshots(steps=[2])
    flags = [*BEST_FLAGS, "--eval_dataset_name", str(workspace["data"])]
    with pytest.raises(KeyboardInterrupt):
        run("full", workspace, output, *flags, callbacks=[snapshots, RecordEval(), InterruptAt(3)])
    resumed = run("full", workspace, output, *flags, "--resume_from_checkpoint", "true", callbacks=[RecordEval()])
    # Rotation (save_total_limit 2) deleted checkpoint-4, kept the latest and the best; each names the best as it is.
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    for checkpoint in output.glob("checkpoint-*"):
        best = json.loads((checkpoint / "trainer_state.json").read_text())["best_model_checkpoint"]
        assert best == str(output / "checkpoint-2"), (checkpoint, best)
    assert resumed.trainer.state.best_model_checkpoint == str(output / "checkpoint-2")
    final = {name: p.detach() for name, p in resumed.trainer.model.named_parameters()}
    differing = [name for name, value in snapshots.at_step[2].items() if not torch.equal(final[name], value)]
    assert not differing, f"the resumed run did not end on the best checkpoint: {differing}"


# --------------------------------------------------------------------------------------------------------------------
# Non-finite weights are never saved


def test_diverged_weights_are_never_saved_and_the_stop_names_the_last_finite_checkpoint(workspace, tmp_path):
    output = tmp_path / "nan"
    with pytest.raises(TrainingDivergedError) as error:
        run("full", workspace, output, "--learning_rate", "1e4", "--save_steps", "1", "--max_steps", "6",
            "--max_grad_norm", "0")
    message = str(error.value)
    saved = sorted(output.glob("checkpoint-*"))
    for checkpoint in saved:
        for name in set(checkpoint_tensor_files(checkpoint).values()):
            assert all(torch.isfinite(t).all() for t in load_file(checkpoint / name).values()), checkpoint
    assert not (output / "model.safetensors").exists() and not (output / ".staging").exists()
    if saved:
        assert f"last checkpoint with finite weights is {saved[-1]}" in message, message
    else:
        assert "no checkpoint with finite weights was saved" in message, message
    assert "NaN/inf" in message and "--learning_rate" in message


class PoisonAfterStep(TrainerCallback):
    """The optimizer step of `step` leaves a weight NaN (by default a routed expert's), as a diverging update would."""

    def __init__(self, step, weight=lambda model: model.model.layers[1].mlp.experts.down_proj[0]):
        self.step, self.weight = step, weight

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.weight(model)[0, 0] = float("nan")


@pytest.mark.parametrize("mode", ["full", "esft"])
def test_a_checkpoint_of_nan_weights_is_refused_before_it_is_written(mode, workspace, tmp_path):
    output = tmp_path / "poisoned"
    with pytest.raises(TrainingDivergedError, match="after the optimizer step of step 4, 1 weight tensors "
                                                    r"are NaN/inf \(e.g. .*down_proj\); .*checkpoint-4 was not saved"):
        run(mode, workspace, output, "--max_steps", "6", callbacks=[PoisonAfterStep(4)])
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (output / ".staging").exists()


def test_a_frozen_but_saved_weight_that_is_nan_is_refused_too(workspace, tmp_path):
    output = tmp_path / "frozen"
    frozen_router = PoisonAfterStep(4, lambda model: model.model.layers[2].mlp.gate.weight)
    with pytest.raises(TrainingDivergedError, match=r"step 4, 1 weight tensors are NaN/inf \(e.g. "
                                                    r"model.layers.2.mlp.gate.weight\); .*checkpoint-4 was not saved"):
        run("full", workspace, output, "--max_steps", "6", callbacks=[frozen_router])
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]


def test_nan_weights_after_the_last_step_leave_no_final_model(workspace, tmp_path):
    output = tmp_path / "final"
    with pytest.raises(TrainingDivergedError, match=r"step 3, .*NaN/inf.*was not saved.*checkpoint-2"):
        run("full", workspace, output, "--max_steps", "3", callbacks=[PoisonAfterStep(3)])
    assert not (output / "config.json").exists() and not (output / "model.safetensors").exists()


def test_nan_loss_names_non_finite_weights_and_the_last_checkpoint(workspace, tmp_path):
    output = tmp_path / "loss"  # no save at step 3: the NaN loss of step 4 finds the weights already NaN
    with pytest.raises(TrainingDivergedError, match=r"NaN/inf at step 4 .*1 weight tensors are already NaN/inf.*"
                                                    r"last checkpoint with finite weights is .*checkpoint-2"):
        run("full", workspace, output, "--max_steps", "6", callbacks=[PoisonAfterStep(3)])


def test_nan_loss_through_the_cli_is_one_line_naming_the_checkpoint(workspace, tmp_path, capsys):
    flags = ["--model_name_or_path", str(workspace["base"]), "--dataset_name", str(workspace["data"]),
             "--output_dir", str(tmp_path / "cli"), *TRAIN_FLAGS, *COMMON, "--learning_rate", "1e4",
             "--max_grad_norm", "0", "--save_steps", "1", "--max_steps", "6"]
    assert main(["sft", *flags]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err) and "NaN/inf" in err[-1] and "checkpoint" in err[-1], err


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint rotation renames before deleting


def test_rotation_keeps_the_latest_and_never_leaves_a_half_deleted_checkpoint(workspace, tmp_path, monkeypatch):
    import shutil

    output, real_rmtree, deleted = tmp_path / "rotate", shutil.rmtree, []

    def rmtree(path, *args, **kwargs):
        deleted.append(Path(path).absolute())
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    run("lora", workspace, output, "--save_steps", "1", "--save_total_limit", "2")
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    # Old checkpoints are deleted only under a hidden name, never in place.
    assert {output / ".checkpoint-1.replaced", output / ".checkpoint-2.replaced"} <= set(deleted)
    assert not {output / "checkpoint-1", output / "checkpoint-2"} & set(deleted)
    assert not list(output.glob(".checkpoint-*")) and not (output / ".staging").exists()


def test_a_checkpoint_that_fails_validation_is_not_committed(workspace, tmp_path, monkeypatch):
    from modeling_deepseekmoe import checkpoint_writer
    from modeling_deepseekmoe.checkpoint import CheckpointError

    def truncate_then_validate(folder, config=None):
        weights = folder / "model.safetensors"
        tensors = load_file(weights)
        tensors.pop(next(iter(tensors)))
        save_file(tensors, weights)
        return real_validate(folder, config)

    real_validate = checkpoint_writer.validate_saved_model
    monkeypatch.setattr(checkpoint_writer, "validate_saved_model", truncate_then_validate)
    output = tmp_path / "invalid"
    with pytest.raises(CheckpointError):
        run("full", workspace, output)
    assert not list(output.glob("checkpoint-*")) and not (output / ".staging").exists()
