import json

import pytest
import torch

from deepseekmoe.finetune.esft.adapter import apply_esft_adapter, save_esft_adapter
from deepseekmoe.finetune.esft.experts import ESFTExperts, prepare_esft_model, unwrap_esft_model
from deepseekmoe.finetune.esft.scoring import ExpertScores, pack_for_scoring, score_experts
from deepseekmoe.finetune.esft.selection import plot_selection, select_experts
from modeling_deepseekmoe import DeepseekMoEForCausalLM

from conftest import tiny_config


def base_model(**overrides):
    torch.manual_seed(0)
    return DeepseekMoEForCausalLM(tiny_config(**overrides)).eval()


def probe_sequences(count=3, length=10, masked_prefix=0):
    generator = torch.Generator().manual_seed(7)
    sequences = []
    for _ in range(count):
        mask = torch.ones(length, dtype=torch.long)
        mask[:masked_prefix] = 0
        sequences.append({"input_ids": torch.randint(2, 96, (length,), generator=generator), "score_mask": mask})
    return sequences


def test_token_scores_sum_to_one_and_gate_scores_to_the_selected_mass():
    model = base_model()
    sequences = probe_sequences()
    scores = score_experts(model, sequences, show_progress=False)
    assert sorted(scores.token) == [1, 2] and scores.num_tokens == 30 and scores.num_sequences == 3
    for layer in (1, 2):
        assert sum(scores.token[layer]) == pytest.approx(1.0, abs=1e-6)
    # Independent: per sequence, the mean over tokens of the chosen experts' routing mass, averaged over sequences.
    masses = {1: [], 2: []}
    for sequence in sequences:
        out = model(sequence["input_ids"][None], output_router_logits=True)
        for layer, logits in zip((1, 2), out.router_logits):
            top = logits.softmax(-1).topk(model.config.num_experts_per_tok, dim=-1).values
            masses[layer].append(top.sum(-1).mean().item())
    for layer in (1, 2):
        assert sum(scores.gate[layer]) == pytest.approx(sum(masses[layer]) / 3, rel=1e-5)


def test_only_masked_in_tokens_are_scored():
    model = base_model()
    full = probe_sequences(masked_prefix=0)
    masked = probe_sequences(masked_prefix=4)
    scores = score_experts(model, masked, show_progress=False)
    assert scores.num_tokens == 18
    assert scores.token != score_experts(model, full, show_progress=False).token


def test_pack_for_scoring_concatenates_to_fixed_length():
    examples = [{"input_ids": list(range(7)), "score_mask": [0, 0, 1, 1, 1, 1, 1]}] * 5
    sequences = pack_for_scoring(examples, sequence_length=10, num_sequences=2)
    assert [len(s["input_ids"]) for s in sequences] == [10, 10]
    assert sequences[0]["score_mask"].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 1]
    with pytest.raises(ValueError, match="probe data is empty"):
        pack_for_scoring([], 10, 2)


def hand_made_scores():
    return ExpertScores(
        gate={1: [0.02, 0.05, 0.01, 0.3], 2: [0.1, 0.1, 0.1, 0.1]},
        token={1: [0.1, 0.5, 0.15, 0.25], 2: [0.25, 0.25, 0.25, 0.25]},
        num_sequences=1,
        num_tokens=10,
        config={},
    )


def test_selection_rule_on_hand_made_scores():
    scores = hand_made_scores()
    assert select_experts(scores, "token")["experts"] == {"1": [1], "2": [0]}
    assert select_experts(scores, "token", p=0.7)["experts"] == {"1": [1, 3], "2": [0, 1, 2]}
    assert select_experts(scores, "gate")["experts"] == {"1": [3], "2": [0]}
    assert select_experts(scores, "gate", p=0.31)["experts"] == {"1": [1, 3], "2": [0, 1, 2, 3]}
    assert select_experts(scores, "token", top_k_per_layer=2)["experts"] == {"1": [1, 3], "2": [0, 1]}
    config = select_experts(scores, "token", shared_experts=True)
    assert config["shared_experts"] is True and config["non_expert_modules"] is False


def test_scores_and_expert_config_round_trip_in_files(tmp_path):
    scores = hand_made_scores()
    loaded = ExpertScores.load(scores.save(tmp_path / "scores.json"))
    assert loaded == scores
    png = plot_selection(scores, select_experts(scores), tmp_path / "selection.png")
    assert png.stat().st_size > 1000


def test_scores_of_another_model_are_refused():
    scores = score_experts(base_model(), probe_sequences(1), show_progress=False)
    with pytest.raises(ValueError, match="different model .*n_routed_experts: scores 8 vs model 16"):
        scores.check_matches(tiny_config(n_routed_experts=16))


SELECTION = {"experts": {"1": [2, 6], "2": [0]}, "shared_experts": False, "non_expert_modules": False}


def train_esft(model, steps=3, gradient_checkpointing=False):
    prepare_esft_model(model, SELECTION)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, 96, (4, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return optimizer, losses


def test_esft_trains_exactly_the_selected_experts(tmp_path):
    base = base_model()
    model = base_model()
    optimizer, losses = train_esft(model, steps=5)
    assert losses[-1] < losses[0]
    # Optimizer state only for the selected experts: each AdamW buffer has exactly their parameter count.
    per_expert = 3 * 32 * 16  # gate, up, down projections of width 16 on hidden 32
    for kind in ("exp_avg", "exp_avg_sq"):
        assert sum(state[kind].numel() for state in optimizer.state.values()) == 3 * per_expert

    adapter = save_esft_adapter(model, SELECTION, tmp_path / "adapter")
    stored = (adapter / "adapter_model.safetensors").stat().st_size
    assert 3 * per_expert * 4 <= stored < 3 * per_expert * 4 + 4096  # the selected experts' fp32 bytes + header

    ids = torch.randint(2, 96, (2, 9))
    trained_logits = model.eval()(ids).logits
    merged = apply_esft_adapter(base_model(), adapter)
    torch.testing.assert_close(merged(ids).logits, trained_logits, atol=1e-5, rtol=1e-5)

    unwrap_esft_model(model)
    assert not any(isinstance(m, ESFTExperts) for m in model.modules())
    before, after = base.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            layer = int(name.split(".")[2])
            changed = (after[name] != tensor).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert changed == SELECTION["experts"][str(layer)], name
        else:
            assert torch.equal(after[name], tensor), name


def test_esft_with_non_reentrant_gradient_checkpointing_matches():
    _, plain = train_esft(base_model(), steps=2)
    _, checkpointed = train_esft(base_model(), steps=2, gradient_checkpointing=True)
    assert checkpointed == pytest.approx(plain, rel=1e-5)


def test_grouped_gpu_path_of_esft_experts_equals_the_loop():
    model = prepare_esft_model(base_model(), SELECTION)
    experts = model.model.layers[1].mlp.experts
    counts = torch.tensor([2, 0, 3, 1, 0, 0, 4, 2])
    rows = torch.randn(int(counts.sum()), 32)
    torch.testing.assert_close(experts._project("gate_up", rows, counts, grouped=True),
                               experts._project("gate_up", rows, counts, grouped=False), atol=1e-5, rtol=1e-5)


def test_shared_and_non_expert_flags_unfreeze_them():
    model = prepare_esft_model(base_model(), {**SELECTION, "shared_experts": True, "non_expert_modules": True})
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in trainable
    assert "model.layers.0.self_attn.q_proj.weight" in trainable and "lm_head.weight" in trainable
    assert not any(name.endswith("mlp.gate.weight") or ".frozen." in name for name in trainable)
    assert json.dumps(SELECTION)


def test_a_batch_routing_no_token_to_any_selected_expert_trains_with_zero_gradients():
    """Everything upstream of the experts is frozen, so without the trained experts in the graph such a batch has
    nothing to differentiate (and on one rank of a multi-process run, that rank would skip the layer's backward)."""
    model = base_model(num_experts_per_tok=1)
    ids = torch.randint(2, 96, (1, 4), generator=torch.Generator().manual_seed(3))
    routed = {}

    def record(index):
        return lambda module, args, output: routed.__setitem__(index, set(output[3].flatten().tolist()))

    for index in (1, 2):
        model.model.layers[index].mlp.gate.register_forward_hook(record(index))
    with torch.no_grad():
        model(ids)
    idle = {str(layer): [min(set(range(8)) - experts)] for layer, experts in routed.items()}
    prepare_esft_model(model, {"experts": idle})
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    for layer in (1, 2):
        experts = model.model.layers[layer].mlp.experts
        for weight in (experts.gate_up_proj, experts.down_proj):
            assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs: non-finite scores, outputs over inputs, unknown flags, a finished run


def test_scores_of_a_nan_poisoned_model_are_refused_and_a_nan_scores_file_selects_nothing(tmp_path, capsys):
    from deepseekmoe.cli import main

    model = base_model()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"MoE layer\(s\) \[1, 2\] .*NaN/inf"):
        score_experts(model, probe_sequences(1), show_progress=False)

    scores = hand_made_scores()
    scores.gate[1][0] = float("nan")
    path = scores.save(tmp_path / "nan_scores.json")
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] from this scores file are NaN/inf"):
        select_experts(ExpertScores.load(path), "gate")
    output = tmp_path / "experts.json"
    assert main(["esft", "select", "--scores_file", str(path), "--output_file", str(output),
                 "--score_function", "gate"]) != 0
    assert "NaN/inf" in capsys.readouterr().err and not output.exists()


@pytest.fixture(scope="module")
def esft_run(tmp_path_factory):
    from deepseekmoe.finetune.esft.train import parse_esft_args, run_esft
    from test_sft import TOY_ROWS, TRAIN_FLAGS, write_base, write_jsonl

    root = tmp_path_factory.mktemp("esft_cli")
    (root / "sel.json").write_text(json.dumps(SELECTION))
    argv = ["--model_name_or_path", str(write_base(root / "base")), "--dataset_name",
            str(write_jsonl(root / "task.jsonl", TOY_ROWS)), "--expert_config", str(root / "sel.json"),
            "--output_dir", str(root / "adapter"), "--max_steps", "1", *TRAIN_FLAGS]
    run_esft(*parse_esft_args(argv))
    return root, argv


@pytest.mark.parametrize("target", ["base", "adapter"])
def test_esft_merge_never_overwrites_its_inputs(esft_run, target, capsys):
    from deepseekmoe.cli import main

    root, _ = esft_run
    before = sorted(p.name for p in (root / target).iterdir())
    assert main(["esft", "merge", "--model_name_or_path", str(root / "base"), "--adapter_name_or_path",
                 str(root / "adapter"), "--output_dir", str(root / target), "--overwrite"]) != 0
    err = capsys.readouterr().err
    assert "would destroy it" in err and "Traceback" not in err, err
    assert sorted(p.name for p in (root / target).iterdir()) == before


def test_esft_merge_overwrite_replaces_an_earlier_output(esft_run, capsys):
    from deepseekmoe.cli import main

    root, _ = esft_run
    merge = ["esft", "merge", "--model_name_or_path", str(root / "base"), "--adapter_name_or_path",
             str(root / "adapter"), "--output_dir", str(root / "merged")]
    (root / "merged").mkdir()
    (root / "merged" / "old.txt").write_text("earlier output")
    assert main(merge) != 0 and "--overwrite" in capsys.readouterr().err
    assert main([*merge, "--overwrite"]) == 0
    assert (root / "merged" / "config.json").is_file() and not (root / "merged" / "old.txt").exists()


def test_esft_train_refuses_unknown_flags_and_skips_a_finished_run(esft_run, capsys):
    from deepseekmoe.cli import main

    root, argv = esft_run
    with pytest.raises(SystemExit) as exit_info:
        main(["esft", "train", *argv, "--lerning_rate", "1e-3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --lerning_rate" in capsys.readouterr().err

    weights = (root / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["esft", "train", *argv, "--resume_from_checkpoint", "true"]) == 0
    out = capsys.readouterr().out
    assert "ESFT adapter saved" not in out and out.strip(), out
    assert (root / "adapter" / "adapter_model.safetensors").read_bytes() == weights
