"""Supervised fine-tuning (finetune/): full, LoRA, QLoRA on a tiny DeepSeekMoE and a toy chat task, on CPU.

Every run goes through the public entry points (`parse_sft_args` with CLI flag names, `run_sft`, `merge_adapter`).
"""

import argparse
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from deepseekmoe.finetune.callbacks import MoETrainingMonitor, TrainingDivergedError
from deepseekmoe.finetune.cli import add_merge_parser, add_sft_parser
from deepseekmoe.finetune.data import DatasetValidationError, prepare_sft_dataset
from deepseekmoe.finetune.lora import load_lora_adapter
from deepseekmoe.finetune.merge import merge_adapter
from deepseekmoe.finetune.sft import parse_sft_args, run_sft
from deepseekmoe.finetune.trainer import DeepseekMoESFTTrainer
from modeling_deepseekmoe import DeepseekMoEForCausalLM
from modeling_deepseekmoe.checkpoint import checkpoint_tensor_files, read_tensor_shapes, released_tensor_shapes
from modeling_deepseekmoe.quantization import configure_4bit_cpu_kernels
from modeling_deepseekmoe.tokenization import build_tokenizer

from conftest import tiny_config


WORDS = ["apple", "river", "stone", "cloud", "light", "green", "table", "music"]
TOY_ROWS = [
    {"messages": [{"role": "user", "content": f"Repeat: {word}"}, {"role": "assistant", "content": "I agree."}]}
    for word in WORDS
]
# One full batch per step, constant learning rate: the toy task is memorised within a few steps.
TRAIN_FLAGS = [
    "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
    "--logging_steps", "1", "--save_strategy", "no", "--bf16", "false", "--use_cpu", "true", "--max_length", "64",
    "--dtype", "float32", "--gradient_checkpointing", "false", "--report_to", "none", "--seed", "0",
    "--disable_tqdm", "true", "--dataloader_num_workers", "0",
]  # fmt: skip


def write_base(directory, **overrides):
    """A tiny random DeepSeekMoE (released layout) + tiny tokenizer with the DeepSeek chat template. Weights are drawn
    with std 0.1 (not 0.02) so that a frozen random LM head leaves a LoRA-only run room to lower the loss."""
    tokenizer = build_tokenizer(512, save_directory=directory)
    values = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=128,
        initializer_range=0.1,
    )
    config = tiny_config(**{**values, **overrides})
    torch.manual_seed(0)
    DeepseekMoEForCausalLM(config).save_pretrained(directory)
    return directory


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", TOY_ROWS)


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


class WeightSnapshots(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {name: p.detach().clone() for name, p in model.named_parameters()}

    def changed(self) -> set[str]:
        return {name for name, value in self.before.items() if not torch.equal(value, self.after[name])}


def sft(base_dir, data, output_dir, *flags, callbacks=None, train=True):
    argv = ["--model_name_or_path", str(base_dir), "--dataset_name", str(data), "--output_dir", str(output_dir)]
    return run_sft(*parse_sft_args(argv + TRAIN_FLAGS + list(flags)), callbacks=callbacks, train=train)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_released_layout(directory, config):
    files = checkpoint_tensor_files(directory)
    shapes = {}
    for name in set(files.values()):
        shapes.update(read_tensor_shapes(directory / name))
    assert shapes == released_tensor_shapes(config)


def assert_merged_matches_adapter(merged_dir, base_model, adapter_dir):
    merged = DeepseekMoEForCausalLM.from_pretrained(merged_dir).eval()
    assert_released_layout(merged_dir, merged.config)
    # On a 4-bit base, bitsandbytes' packed AVX512-BF16 kernel computes in bf16: compare on the exact dequantizing path.
    configure_4bit_cpu_kernels(base_model, packed=False)
    adapted = load_lora_adapter(base_model, adapter_dir).eval()
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=2e-5, rtol=1e-5)
    return merged


# --------------------------------------------------------------------------------------------------------------------
# Modes


def test_full_finetuning_learns_freezes_router_and_reports(base_dir, toy_data, tmp_path):
    snapshots = WeightSnapshots()
    result = sft(base_dir, toy_data, tmp_path / "full", "--max_steps", "5", callbacks=[snapshots])
    curve = losses(result.trainer)
    assert curve[-1] < curve[0] - 2.0, curve

    changed = snapshots.changed()
    assert not [name for name in changed if name.endswith("mlp.gate.weight")], "routers are frozen by default"
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.mlp.experts.gate_up_proj", "model.layers.2.mlp.shared_experts.down_proj.weight",
                 "lm_head.weight"):  # fmt: skip
        assert name in changed

    # Aux loss and expert load are logged; plots and summary written; output in the released layout.
    logged = result.trainer.state.log_history[0]
    assert logged["aux_loss"] > 0 and "moe/load_cv" in logged and "moe/idle_experts" in logged
    output = tmp_path / "full"
    for name in ("loss_curve.png", "run_summary.json", "expert_load/heatmap.png", "expert_load/load.jsonl"):
        assert (output / name).is_file(), name
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"] - 2 * 8 * 32  # all but the two routers
    assert summary["tokens_per_second"] > 0 and summary["peak_memory_gib"] > 0
    load = json.loads((output / "expert_load/total.json").read_text())
    assert load["layers"] == [1, 2] and len(load["load"][0]) == 8
    assert_released_layout(output, result.trainer.model.config)
    reloaded = DeepseekMoEForCausalLM.from_pretrained(output)
    torch.testing.assert_close(reloaded.model.layers[1].mlp.experts.down_proj, snapshots.after[
        "model.layers.1.mlp.experts.down_proj"])


def test_lora_on_attention_changes_only_adapter_and_merges(base_dir, toy_data, tmp_path):
    snapshots = WeightSnapshots()
    output = tmp_path / "lora"
    result = sft(base_dir, toy_data, output, "--max_steps", "5", "--use_peft", "--lora_target_modules", "attention",
                 callbacks=[snapshots])  # fmt: skip
    curve = losses(result.trainer)
    assert curve[-1] < curve[0] - 0.8, curve
    changed = snapshots.changed()
    assert changed and all("lora_" in name and "self_attn" in name for name in changed), changed
    assert any("lora_B" in name for name in changed)

    # `deepseekmoe merge` (CLI layer over merge_adapter) writes the released layout, same logits as the adapter.
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    add_merge_parser(commands)
    args = parser.parse_args(["merge", "--model_name_or_path", str(base_dir), "--adapter_name_or_path", str(output),
                              "--output_dir", str(tmp_path / "merged")])  # fmt: skip
    args.func(args)
    assert_merged_matches_adapter(tmp_path / "merged", DeepseekMoEForCausalLM.from_pretrained(base_dir), output)


def test_lora_on_experts_by_layer_with_router(base_dir, toy_data, tmp_path):
    snapshots = WeightSnapshots()
    output = tmp_path / "lora_experts"
    result = sft(base_dir, toy_data, output, "--max_steps", "5", "--use_peft", "--lora_target_modules", "experts",
                 "shared_experts", "--lora_layers", "2", "--lora_dropout", "0.1", "--train_router",
                 callbacks=[snapshots])  # fmt: skip
    curve = losses(result.trainer)
    assert curve[-1] < curve[0] - 0.8, curve
    changed = snapshots.changed()
    assert any("layers.2.mlp.experts.lora_" in name for name in changed)
    assert any("layers.2.mlp.shared_experts" in name and "lora_B" in name for name in changed)
    assert {name for name in changed if "mlp.gate" in name} == {
        f"base_model.model.model.layers.{i}.mlp.gate.modules_to_save.default.weight" for i in (1, 2)
    }
    assert all("layers.2." in name or "mlp.gate.modules_to_save" in name for name in changed), changed

    base = DeepseekMoEForCausalLM.from_pretrained(base_dir)
    merge_adapter(base_dir, output, tmp_path / "merged")
    fresh_base = DeepseekMoEForCausalLM.from_pretrained(base_dir)
    merged = assert_merged_matches_adapter(tmp_path / "merged", fresh_base, output)
    merged_layers, base_layers = merged.model.layers, base.model.layers
    assert torch.equal(merged_layers[1].mlp.experts.gate_up_proj, base_layers[1].mlp.experts.gate_up_proj)
    assert not torch.equal(merged_layers[2].mlp.experts.gate_up_proj, base_layers[2].mlp.experts.gate_up_proj)
    assert not torch.equal(merged_layers[1].mlp.gate.weight, base_layers[1].mlp.gate.weight)


def qlora_skip_reason(targets) -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if importlib.util.find_spec("modeling_deepseekmoe.quantization") is None:
        return "modeling_deepseekmoe.quantization (4-bit DeepSeekMoE) is not available"
    if "experts" in targets:
        from deepseekmoe.finetune.lora import build_lora_config
        from modeling_deepseekmoe.quantization import DeepseekMoEQuantizedExperts

        if DeepseekMoEQuantizedExperts not in (build_lora_config("experts")._custom_modules or {}):
            return "the expert LoRA layer is not registered for 4-bit routed experts (finetune/lora.py)"
    return None


QLORA_TARGETS = [("attention", "shared_experts"), ("experts",)]


@pytest.mark.parametrize("targets", QLORA_TARGETS, ids=["attention+shared", "routed-experts"])
def test_qlora_trains_adapter_on_frozen_4bit_base_and_merges(targets, base_dir, toy_data, tmp_path):
    if qlora_skip_reason(targets):
        pytest.skip(qlora_skip_reason(targets))
    from transformers import BitsAndBytesConfig

    snapshots = WeightSnapshots()
    output = tmp_path / "qlora"
    result = sft(base_dir, toy_data, output, "--max_steps", "5", "--use_peft", "--load_in_4bit",
                 "--lora_target_modules", *targets, callbacks=[snapshots])  # fmt: skip
    curve = losses(result.trainer)
    assert curve[-1] < curve[0] - 0.8, curve
    changed = snapshots.changed()
    assert changed and all("lora_" in name for name in changed), changed
    assert getattr(result.trainer.model.get_base_model(), "is_loaded_in_4bit", False)

    # Merged into the dequantized 4-bit weights it was trained against (recorded in sft_run.json).
    merge_adapter(base_dir, output, tmp_path / "merged")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    quantized = DeepseekMoEForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=bnb)
    assert_merged_matches_adapter(tmp_path / "merged", quantized, output)


# --------------------------------------------------------------------------------------------------------------------
# Resume, aux loss, packing


class InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated interruption after step {self.step}")


def test_lora_resume_continues_the_loss_curve(base_dir, toy_data, tmp_path):
    flags = ["--max_steps", "4", "--use_peft", "--lora_target_modules", "attention", "experts", "--lora_dropout",
             "0.1", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "3e-3"]  # fmt: skip
    uninterrupted = losses(sft(base_dir, toy_data, tmp_path / "a", *flags).trainer)

    output = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        sft(base_dir, toy_data, output, *flags, callbacks=[InterruptAt(3)])
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (output / ".staging").exists()
    # A half-written checkpoint (as an interrupted save leaves it) is never picked up.
    (output / ".staging" / "checkpoint-3").mkdir(parents=True)
    resumed = sft(base_dir, toy_data, output, *flags, "--resume_from_checkpoint", "true")
    assert [e["step"] for e in resumed.trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]
    torch.testing.assert_close(losses(resumed.trainer), uninterrupted, rtol=1e-5, atol=1e-6)


def flat_grads(model) -> torch.Tensor:
    grads = [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads)


def test_the_balance_loss_counts_the_expert_load_the_routing_record_counts():
    """One per-expert load computation: per segment (a sequence, padding excluded), the balance loss is
    E / (K T) * sum_i count_i * mean_t P_i, count_i as `routing.expert_counts` counts the segment's tokens."""
    from modeling_deepseekmoe.modeling_deepseekmoe import aux_loss_segments, expert_balance_loss
    from modeling_deepseekmoe.routing import expert_counts

    batch, length, experts, top_k = 3, 7, 8, 3
    mask = torch.ones(batch, length)
    mask[0, :3] = 0
    segments = aux_loss_segments(tiny_config(seq_aux=True, aux_loss_ignore_padding=True), batch, length,
                                 torch.device("cpu"), mask)  # fmt: skip
    scores = torch.randn(batch * length, experts, generator=torch.Generator().manual_seed(0)).softmax(-1)
    top_k_index = scores.topk(top_k, dim=-1).indices
    expected = []
    for segment in range(batch):
        rows = segments.segment_ids == segment
        weight = segments.token_weight[rows]
        tokens = weight.sum()
        counts = expert_counts(top_k_index[rows], experts, weight)
        assert counts.sum() == top_k * tokens  # padding routes no slot
        expected.append((counts * experts / (top_k * tokens) * (scores[rows] * weight[:, None]).sum(0) / tokens).sum())
    torch.testing.assert_close(expert_balance_loss(scores, top_k_index, segments), torch.stack(expected).mean())


def test_aux_loss_is_applied_once_and_logged_as_the_models(base_dir, toy_data, tmp_path):
    result = sft(base_dir, toy_data, tmp_path / "aux", "--max_steps", "1", "--aux_loss_alpha", "0.5", train=False)
    trainer, model = result.trainer, result.trainer.model
    assert not trainer.aux_loss_enabled and model.config.output_router_logits is False  # TRL adds nothing
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}

    model.eval()
    reported = model(**model_inputs, output_router_logits=True).aux_loss
    reported.backward()  # eval mode: nothing injected, the gradient of the reported value alone
    aux_grad = flat_grads(model)
    model.train()
    model.config.aux_loss_alpha = 0.0
    trainer.compute_loss(model, dict(inputs)).backward()
    ce_grad = flat_grads(model)
    model.config.aux_loss_alpha = 0.5
    assert aux_grad.norm() > 1e-3 * ce_grad.norm()
    for reentrant in (None, False, True):
        if reentrant is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        trainer.compute_loss(model, dict(inputs)).backward()
        total_grad = flat_grads(model)
        torch.testing.assert_close(total_grad, ce_grad + aux_grad, atol=1e-6, rtol=1e-4)
    model.gradient_checkpointing_disable()

    trainer.train()  # one step on the same (single, full) batch and weights
    logged = trainer.state.log_history[0]["aux_loss"]
    assert logged == pytest.approx(reported.item(), rel=1e-5)

    trainer.args.router_aux_loss_coef = 0.01  # TRL's Mixtral loss on top: refused
    with pytest.raises(ValueError, match="aux_loss_alpha"):
        DeepseekMoESFTTrainer(model.__class__.from_pretrained(base_dir), trainer.args,
                              train_dataset=trainer.train_dataset, processing_class=trainer.processing_class)


def test_packed_batch_gives_the_unpacked_per_document_loss(base_dir, toy_data, tmp_path):
    result = sft(base_dir, toy_data, tmp_path / "packed", "--packing", "true", "--max_length", "128", train=False)
    trainer, model = result.trainer, result.trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    position_ids = batch["position_ids"][0]
    starts = (position_ids == 0).nonzero().flatten().tolist() + [len(position_ids)]
    assert len(starts) - 1 >= 4  # several documents in the packed row
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        for start, end in zip(starts[:-1], starts[1:]):
            ids, labels = batch["input_ids"][:, start:end], batch["labels"][0, start:end]
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed_logits[start:end], alone, atol=2e-5, rtol=1e-4)
            per_doc = [torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
                       for logits in (packed_logits[start:end], alone)]  # fmt: skip
            torch.testing.assert_close(per_doc[0], per_doc[1], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Bad input and guard rails


def conversation(*roles):
    return {"messages": [{"role": role, "content": f"{role} text"} for role in roles]}


BAD_INPUTS = {
    "empty dataset": ([], {}, "empty"),
    "no known columns": ([{"question": "q", "answer": "a"}], {}, "none of the supported formats"),
    "messages missing": ([conversation("user", "assistant"), {"messages": None}], {}, "Row 1: field 'messages'"),
    "content missing": ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}], {},
                        "Row 0: messages[0].content"),
    "not alternating": ([conversation("user", "user", "assistant")], {},
                        "Row 0: messages[1].role is 'user' where 'assistant' was expected"),
    "ends with user": ([conversation("user", "assistant"), conversation("user", "assistant", "user")], {},
                       "Row 1: messages ends with a user turn"),
    "system not first": ([conversation("user", "system", "assistant")], {}, "only allowed first"),
    "unknown role": ([conversation("user", "tool")], {}, "messages[1].role is 'tool'"),
    "empty completion": ([{"prompt": "p", "completion": ""}], {}, "Row 0: field 'completion' is empty"),
    "empty text": ([{"text": "fine"}, {"text": "  "}], {}, "Row 1: field 'text'"),
    "all truncated away": ([{"messages": [{"role": "user", "content": "word " * 40},
                                          {"role": "assistant", "content": "answer"}]}],
                           {"max_length": 16}, "Every row is truncated away"),
    "some truncated away": (TOY_ROWS[:2] + [{"messages": [{"role": "user", "content": "word " * 40},
                                                          {"role": "assistant", "content": "answer"}]}],
                            {"max_length": 32}, "row 2 (first trained token at position"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_row_and_field(case, tokenizer, tmp_path):
    rows, options, message = BAD_INPUTS[case]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetValidationError) as error:
        prepare_sft_dataset(data, tokenizer, **options)
    assert message in str(error.value)


def test_truncated_rows_can_be_dropped_and_bad_data_fails_before_the_model_loads(tokenizer, tmp_path, toy_data):
    rows, options, _ = BAD_INPUTS["some truncated away"]
    kept = prepare_sft_dataset(Dataset.from_list(rows), tokenizer, drop_truncated_rows=True, **options)
    assert len(kept) == 2
    data = write_jsonl(tmp_path / "bad.jsonl", [conversation("user", "assistant", "user")])
    with pytest.raises(DatasetValidationError, match="Row 0"):  # the model path does not even exist
        run_sft(*parse_sft_args(["--model_name_or_path", str(tmp_path / "missing"), "--tokenizer_name_or_path",
                                 str(tokenizer.name_or_path), "--dataset_name", str(data), "--output_dir",
                                 str(tmp_path / "out")] + TRAIN_FLAGS))  # fmt: skip


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode([token for token, label in zip(row["input_ids"], row["labels"]) if label != -100])


def test_formats_loss_masks_and_file_types(tokenizer, tmp_path):
    eos = tokenizer.eos_token
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"}]  # fmt: skip
    row = prepare_sft_dataset(Dataset.from_list([{"messages": chat}]), tokenizer)[0]
    assert trained_text(tokenizer, row) == f" Hello{eos} Goodbye{eos}"  # answers + EOS, never "Assistant:"
    row = prepare_sft_dataset(Dataset.from_list([{"messages": chat}]), tokenizer, assistant_only_loss=False)[0]
    assert row["labels"] == row["input_ids"]
    row = prepare_sft_dataset(Dataset.from_list([{"prompt": "2 + 2 =", "completion": " 4"}]), tokenizer)[0]
    assert trained_text(tokenizer, row).endswith(f"4{eos}") and "2 +" not in trained_text(tokenizer, row)
    conversational = {"prompt": chat[:2], "completion": [{"role": "assistant", "content": "Hello"}]}
    row = prepare_sft_dataset(Dataset.from_list([conversational]), tokenizer)[0]
    assert trained_text(tokenizer, row) == f" Hello{eos}"
    row = prepare_sft_dataset(Dataset.from_list([{"text": "plain text"}]), tokenizer)[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tokenizer.eos_token_id

    # The same rows from JSONL, Parquet, CSV (message lists stored as JSON strings) and a save_to_disk folder.
    reference = prepare_sft_dataset(write_jsonl(tmp_path / "rows.jsonl", TOY_ROWS), tokenizer)
    Dataset.from_list(TOY_ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    Dataset.from_list([{"messages": json.dumps(r["messages"])} for r in TOY_ROWS]).to_csv(str(tmp_path / "rows.csv"))
    from datasets import DatasetDict

    DatasetDict({"train": Dataset.from_list(TOY_ROWS)}).save_to_disk(str(tmp_path / "saved"))
    for source in ("rows.parquet", "rows.csv", "saved"):
        assert prepare_sft_dataset(tmp_path / source, tokenizer)["labels"] == reference["labels"], source
    with pytest.raises(DatasetValidationError, match="splits"):
        prepare_sft_dataset(tmp_path / "saved", tokenizer, split="validation")


class PoisonWeights(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            with torch.no_grad():
                model.model.embed_tokens.weight.fill_(float("nan"))


def test_nan_loss_stops_the_run_naming_the_step(base_dir, toy_data, tmp_path):
    with pytest.raises(TrainingDivergedError, match="NaN/inf at step 2 .*divergence"):
        sft(base_dir, toy_data, tmp_path / "nan", "--max_steps", "3", callbacks=[PoisonWeights()])


def test_zero_loss_and_fp16_overflow_messages():
    monitor = MoETrainingMonitor(guard=True)
    monitor._step_losses, monitor._step_label_counts = [torch.tensor(0.0)], [torch.tensor(12)]
    with pytest.raises(TrainingDivergedError, match="exactly 0 at step 7"):
        monitor._check_loss(SimpleNamespace(fp16=False), 7)
    monitor._step_losses, monitor._step_label_counts = [torch.tensor(float("inf"))], [torch.tensor(12)]
    with pytest.raises(TrainingDivergedError, match="at step 3.*fp16 overflow"):
        monitor._check_loss(SimpleNamespace(fp16=True), 3)
    monitor._step_losses, monitor._step_label_counts = [torch.tensor(0.0)], [torch.tensor(0)]
    monitor._check_loss(SimpleNamespace(fp16=False), 4)  # nothing to train in that batch: not a collapse


def test_precision_without_bf16_is_refused_clearly(monkeypatch):
    from deepseekmoe.finetune import sft as sft_module

    args = SimpleNamespace(fp16=False, bf16=None, use_cpu=False)
    monkeypatch.setattr(sft_module, "is_torch_bf16_gpu_available", lambda: False)
    sft_module.resolve_precision(args)  # no GPU: fp32, not transformers' "doesn't support bf16/gpu"
    assert args.bf16 is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(ValueError, match="Tesla V100 has no bf16.*--fp16.*--bf16 false"):
        sft_module.resolve_precision(SimpleNamespace(fp16=False, bf16=None, use_cpu=False))
    sft_module.resolve_precision(SimpleNamespace(fp16=True, bf16=False, use_cpu=False))  # fp16 chosen: accepted


def test_cli_flags_and_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: some/model\ndataset_name: train.jsonl\nuse_peft: true\nlearning_rate: 1e-4\n"
        f"lora_target_modules: [attention, experts]\nlora_layers: [1, 2]\nmax_steps: 3\noutput_dir: {tmp_path / 'o'}\n"
    )
    parser = argparse.ArgumentParser(prog="deepseekmoe")
    commands = parser.add_subparsers(dest="command", required=True)
    add_sft_parser(commands)
    args = parser.parse_args(["sft", "--config", str(config), "--max_steps", "7", "--aux_loss_alpha", "0"])
    model_args, data_args, training_args = parse_sft_args(args.sft_argv)
    assert (model_args.use_peft, model_args.lora_target_modules, model_args.lora_layers) == (
        True, ["attention", "experts"], [1, 2])  # fmt: skip
    assert (training_args.learning_rate, training_args.max_steps, model_args.aux_loss_alpha) == (1e-4, 7, 0.0)
    assert training_args.assistant_only_loss and data_args.dataset_name == "train.jsonl"
    shipped = Path(__file__).resolve().parents[1] / "finetune" / "configs" / "sft_lora.yaml"
    model_args, _, training_args = parse_sft_args(["--config", str(shipped), "--use_cpu", "true"])
    assert model_args.use_peft and training_args.gradient_accumulation_steps == 16
    config.write_text("model_name_or_path: m\nno_such_option: 1\n")
    with pytest.raises(ValueError, match="no_such_option"):
        parse_sft_args(["--config", str(config)])
    with pytest.raises(ValueError, match="--use_peft"):
        parse_sft_args(["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--load_in_4bit"])
