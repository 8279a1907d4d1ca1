"""Routing analysis (`deepseekmoe.eval.analysis`) on tiny models, some with hand-planted routing."""

import argparse
import json
import random
from collections import Counter

import pytest
import torch
from conftest import tiny_config

from deepseekmoe.eval.analysis import (
    EncodedSample,
    OutputNormCollector,
    TextSample,
    TopTokenCounter,
    collect_routing_statistics,
    disable_experts,
    evaluate_loss,
    expert_output_norms,
    expert_similarity,
    load_samples,
    parse_ratios,
    routing_override,
    run_ablations,
    run_data_pass,
    static_analysis,
    without_shared_experts,
)
from deepseekmoe.eval.analysis.ablation import experts_for_ratio
from deepseekmoe.eval.analysis.cli import add_analyze_parser
from deepseekmoe.eval.analysis.static import ExpertWeightSummary, router_alignment
from modeling_deepseekmoe import DeepseekMoEForCausalLM
from modeling_deepseekmoe.tokenization import build_tokenizer


DOMAIN_A, DOMAIN_B = range(2, 42), range(42, 82)  # token id ranges of the two planted domains
MOE_LAYERS = (1, 2)


def planted_model() -> DeepseekMoEForCausalLM:
    """A tiny model whose routers send domain-A tokens to experts {0, 1} and domain-B tokens to {2, 3} in every MoE
    layer; experts 4..7 are never selected.

    Attention outputs and the dense layer 0 are zeroed, so the residual stream entering layer 1 is the token
    embedding; A embeddings point along hidden dim 0 and B along dim 1 (plus small noise), and RMSNorm keeps those
    directions. Router rows 0/1 read dim 0, rows 2/3 dim 1, rows 4..7 are zero. The routed experts' outputs are small
    next to the embeddings, so layer 2 sees the same directions and routes the same way."""
    torch.manual_seed(0)
    model = DeepseekMoEForCausalLM(tiny_config(num_experts_per_tok=2)).eval()
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        embedding = model.model.embed_tokens.weight
        embedding.normal_(0.0, 0.05)
        embedding[list(DOMAIN_A), 0] += 3.0
        embedding[list(DOMAIN_B), 1] += 3.0
        for layer in MOE_LAYERS:
            block = model.model.layers[layer].mlp
            router = torch.zeros(8, hidden)
            router[0, 0], router[1, 0] = 2.0, 1.5
            router[2, 1], router[3, 1] = 2.0, 1.5
            block.gate.weight.copy_(router)
            block.experts.down_proj.mul_(50.0)  # make the routed experts matter for the loss
    return model


def planted_samples(per_domain: int = 6, length: int = 12) -> list[EncodedSample]:
    rng = random.Random(0)
    samples = []
    for _ in range(per_domain):
        samples.append(EncodedSample(tuple(rng.choice(DOMAIN_A) for _ in range(length)), "A"))
        samples.append(EncodedSample(tuple(rng.choice(DOMAIN_B) for _ in range(length)), "B"))
    return samples


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    samples = planted_samples()
    statistics, loss = collect_routing_statistics(model, samples, batch_size=4, progress=False)
    return model, samples, statistics, loss


def test_planted_domains_are_reported_on_their_experts(planted):
    _, _, statistics, _ = planted
    assert statistics.layers == list(MOE_LAYERS) and statistics.domains == ["A", "B"]
    for layer in MOE_LAYERS:
        row = statistics.row(layer)
        assert sorted(statistics.top_experts(layer, "A")) == [0, 1]
        assert sorted(statistics.top_experts(layer, "B")) == [2, 3]
        assert statistics.domain_load_share("A")[row, [0, 1]].sum() == pytest.approx(1.0)
        assert statistics.domain_load_share("A")[row, 0] == pytest.approx(0.5)  # top-2 of 2: each token uses both
        assert statistics.balance()["unused_experts"][row] == 4
        assert statistics.load_share[row].sum() == pytest.approx(1.0)
        # Expert 0 carries more weight than expert 1 (router row 2.0 vs 1.5) on the same tokens.
        assert statistics.mean_weight[row, 0] > statistics.mean_weight[row, 1] > 0
        for expert, domain in ((0, DOMAIN_A), (3, DOMAIN_B)):
            assert all(token in domain for token, _ in statistics.top_tokens[row].top(expert, 50))
    assert torch.allclose(statistics.specialisation(), torch.ones(2, 2, dtype=torch.float64))
    assert statistics.domain_lift("A")[0, 0] == pytest.approx(2.0)  # A is half the tokens and all of expert 0's
    table = statistics.to_dict()
    assert table["domains"]["B"]["top_experts"]["1"][:2] in ([2, 3], [3, 2])


def test_disabling_an_unused_expert_leaves_the_loss_unchanged_and_a_used_one_changes_it(planted):
    model, samples, _, baseline = planted
    with disable_experts(model, {layer: [6] for layer in MOE_LAYERS}):
        unused = evaluate_loss(model, samples, progress=False)
    with disable_experts(model, {1: [0]}):
        used = evaluate_loss(model, samples, progress=False)
        rerouted, _ = collect_routing_statistics(model, samples, progress=False)
    assert unused.loss == baseline.loss
    assert abs(used.loss - baseline.loss) > 1e-4
    # Layer 1's A tokens lost expert 0 and took the next best; layer 2 is untouched.
    assert rerouted.counts[0, 0] == 0 and rerouted.counts[0, 1] == rerouted.domain_tokens["A"][0]
    assert rerouted.counts[1, 0] > 0
    # Every hook is gone afterwards.
    assert all(not model.model.layers[layer].mlp.gate._forward_hooks for layer in MOE_LAYERS)
    assert evaluate_loss(model, samples, progress=False).loss == baseline.loss


def test_per_token_top_r_disables_each_tokens_best_experts(planted):
    model, samples, _, _ = planted
    with routing_override(model, per_token_top_r=1):
        statistics, _ = collect_routing_statistics(model, samples, progress=False)
    for layer in MOE_LAYERS:
        row = statistics.row(layer)
        assert statistics.domain_counts["A"][row, 0] == 0 and statistics.domain_counts["B"][row, 2] == 0
        assert statistics.domain_counts["A"][row, 1] == statistics.domain_tokens["A"][row]
    with routing_override(model, per_token_random_r=2, seed=3):
        random_statistics, _ = collect_routing_statistics(model, samples, progress=False)
    assert random_statistics.counts.sum() == statistics.counts.sum()


def test_shared_experts_are_removed_and_restored(planted):
    model, samples, _, baseline = planted
    shared = model.model.layers[1].mlp.shared_experts
    with without_shared_experts(model):
        assert model.model.layers[1].mlp.shared_experts is None
        without = evaluate_loss(model, samples, progress=False)
    assert model.model.layers[1].mlp.shared_experts is shared
    assert without.loss != baseline.loss
    assert evaluate_loss(model, samples, progress=False).loss == baseline.loss


def test_run_ablations_table(planted):
    model, samples, statistics, baseline = planted
    result = run_ablations(
        model, samples, [1 / 8, 2 / 8], statistics, baseline, batch_size=len(samples), progress=False
    )
    modes = ("top_per_token", "random_per_token", "most_loaded", "random_experts")
    assert [row["variant"] for row in result["rows"]] == [mode for mode in modes for _ in range(2)]
    assert [row["num_disabled"] for row in result["rows"][:2]] == [1, 2]
    top = next(row for row in result["rows"] if row["variant"] == "top_per_token" and row["ratio"] == 0.25)
    # Disabling both of a token's experts here removes every routed expert it used: the largest change.
    assert abs(top["delta"]) > 0
    assert [row["variant"] for row in result["shared"]] == ["no_shared", "no_shared_more_routed"]
    assert result["shared"][1]["top_k"] == 4
    assert all(not model.model.layers[layer].mlp.gate._forward_hooks for layer in MOE_LAYERS)


def test_streaming_statistics_equal_a_full_pass():
    torch.manual_seed(1)
    model = DeepseekMoEForCausalLM(tiny_config()).eval()
    rng = random.Random(1)
    samples = [
        EncodedSample(tuple(rng.randrange(96) for _ in range(rng.randrange(3, 20))), rng.choice(["x", "y", "z"]))
        for _ in range(10)
    ]
    full, full_loss = collect_routing_statistics(model, samples, batch_size=len(samples), progress=False)
    streamed, streamed_loss = collect_routing_statistics(model, samples, batch_size=3, progress=False)
    assert torch.equal(full.counts, streamed.counts) and torch.equal(full.tokens, streamed.tokens)
    assert full.tokens[0] == sum(len(sample.input_ids) for sample in samples)  # padding never counted
    # Per-batch sums are float32, so the summation order changes the last bits.
    torch.testing.assert_close(full.weight_sums, streamed.weight_sums, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.score_sums, streamed.score_sums, rtol=1e-5, atol=1e-6)
    for domain in full.domains:
        assert torch.equal(full.domain_counts[domain], streamed.domain_counts[domain])
    for a, b in zip(full.top_tokens, streamed.top_tokens):
        assert all(a.top(expert, 100) == b.top(expert, 100) for expert in range(8))
    assert full_loss.loss == pytest.approx(streamed_loss.loss, rel=1e-5)
    assert full_loss.num_tokens == streamed_loss.num_tokens == sum(len(s.input_ids) - 1 for s in samples)


def test_top_token_counter_is_bounded_and_keeps_heavy_hitters():
    rng = random.Random(0)
    stream = [7] * 300 + [9] * 150 + [rng.randrange(1000) for _ in range(600)]
    rng.shuffle(stream)
    counter = TopTokenCounter(num_experts=2, vocab_size=1000, capacity=8)
    for start in range(0, len(stream), 50):
        chunk = torch.tensor(stream[start : start + 50])
        counter.update(torch.ones_like(chunk), chunk)
        assert counter.keys.numel() <= 8
    exact = Counter(stream)
    top = dict(counter.top(1, 8))
    assert list(top)[:2] == [7, 9]
    for token, count in top.items():
        assert exact[token] - counter.max_undercount(1) <= count <= exact[token]
    assert counter.top(0) == []


def test_expert_similarity_with_a_copy_is_one():
    torch.manual_seed(0)
    model = DeepseekMoEForCausalLM(tiny_config()).eval()
    block = model.model.layers[1].mlp
    width = block.experts.down_proj.shape[-1]
    with torch.no_grad():
        block.experts.gate_up_proj[5] = block.experts.gate_up_proj[0]
        block.experts.down_proj[5] = block.experts.down_proj[0]
        # Shared slice S1 := routed expert 3 (gate rows, up rows and down columns of width moe_intermediate_size).
        gate, up = block.experts.gate_up_proj[3].chunk(2, dim=0)
        block.shared_experts.gate_proj.weight[width : 2 * width] = gate
        block.shared_experts.up_proj.weight[width : 2 * width] = up
        block.shared_experts.down_proj.weight[:, width : 2 * width] = block.experts.down_proj[3]
    for projection in ("gate", "up", "down", "all"):
        matrix, labels = expert_similarity(block, projection)
        assert labels == [str(e) for e in range(8)] + ["S0", "S1"]
        assert matrix[0, 5] == pytest.approx(1.0, abs=1e-6)
        assert matrix[3, labels.index("S1")] == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(matrix.diagonal(), torch.ones(10, dtype=torch.float64))
        assert abs(matrix[0, 1]) < 0.5
    result = static_analysis(model, detail_layer=1)
    assert result["layers"]["1"]["similarity"]["all"]["routed_max"] == pytest.approx(1.0, abs=1e-6)
    assert result["detail"]["similarity"]["all"][0][5] == pytest.approx(1.0, abs=1e-6)


def test_router_rows_equal_to_the_averaged_gate_proj_align_perfectly():
    torch.manual_seed(0)
    model = DeepseekMoEForCausalLM(tiny_config()).eval()
    block = model.model.layers[2].mlp
    with torch.no_grad():
        gate = block.experts.gate_up_proj.chunk(2, dim=1)[0]
        block.gate.weight.copy_(gate.mean(dim=1))
    alignment = router_alignment(ExpertWeightSummary(block))
    assert alignment["pearson_gate"] == pytest.approx(1.0)
    assert alignment["matched_cosine_mean"] == pytest.approx(1.0)
    assert abs(alignment["mismatched_cosine_mean"]) < 0.5


def test_expert_output_norms_match_a_direct_computation():
    torch.manual_seed(0)
    model = DeepseekMoEForCausalLM(tiny_config()).eval()
    experts = model.model.layers[1].mlp.experts
    hidden = torch.randn(5, 32)
    norms = expert_output_norms(experts, hidden)
    gate, up = (hidden @ experts.gate_up_proj[4].T).chunk(2, dim=-1)
    direct = ((torch.nn.functional.silu(gate) * up) @ experts.down_proj[4].T).norm(dim=-1)
    torch.testing.assert_close(norms[:, 4], direct)
    collector = OutputNormCollector(layers=[1], max_tokens=20)
    samples = [EncodedSample(tuple(range(2, 14)), "d")] * 3
    run_data_pass(model, samples, batch_size=2, collectors=[collector], compute_loss=False, progress=False)
    summary = collector.summary(1)
    assert summary["tokens"] == 20
    assert sum(map(sum, summary["rank_counts"])) == 20 * 8
    assert -1.0 <= summary["spearman"] <= 1.0 and 0.0 <= summary["topk_overlap"] <= 1.0


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_samples(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no non-empty text"):
        load_samples(tmp_path / "empty.txt")
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"line 2 has no 'text' field .*--text_field"):
        load_samples(tmp_path / "rows.jsonl")
    (tmp_path / "other.jsonl").write_text('{"content": "a", "source": "web"}\n')
    loaded = load_samples(tmp_path / "other.jsonl", text_field="content", domain_field="source")
    assert loaded == [TextSample("a", "web")]
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_samples(tmp_path / "broken.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.txt .* \.jsonl"):
        load_samples(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="not a number or fraction"):
        parse_ratios("1/16,lots")
    with pytest.raises(ValueError, match="leaving fewer than the 6"):
        experts_for_ratio(0.95, 64, 6)
    model = DeepseekMoEForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"Layer 0 is not a MoE layer .* \[1, 2\]"):
        static_analysis(model, detail_layer=0)
    with pytest.raises(ValueError, match="leaves fewer than the 3"):
        with routing_override(model, per_token_top_r=6):
            pass
    with pytest.raises(ValueError, match=r"must lie in 0\.\.7"):
        with disable_experts(model, {1: [2], 2: [8]}):
            pass
    assert not any(model.model.layers[layer].mlp.gate._forward_hooks for layer in MOE_LAYERS)
    with pytest.raises(ValueError, match="'most_loaded' ablation needs routing statistics"):
        run_ablations(model, [EncodedSample((2, 3, 4), "d")], [1 / 8], modes=["most_loaded"], progress=False)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("analysis-model")
    tokenizer = build_tokenizer(vocab_size=300, save_directory=directory)
    torch.manual_seed(0)
    model = DeepseekMoEForCausalLM(tiny_config(vocab_size=320))
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(directory)
    return directory


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deepseekmoe")
    add_analyze_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_analyze_end_to_end(saved_model, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"text": f"The sum of {i} and {i + 2} is {2 * i + 2}.", "domain": "math"} for i in range(5)]
    rows += [{"text": f"Once upon a time a fox met bird number {i}.", "domain": "story"} for i in range(5)]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    (tmp_path / "code.txt").write_text("def f(x):\n    return x + 1\nprint(f(2))\n")
    output = tmp_path / "out"
    argv = ["analyze", str(saved_model), "--data", str(data), str(tmp_path / "code.txt"), "--output_dir", str(output)]
    argv += ["--batch_size", "4", "--max_length", "24", "--layer", "1", "--norm_tokens", "16", "--seed", "1"]
    argv += ["--ablation_ratios", "1/8", "--ablation_modes", "top_per_token,random_experts"]
    argv += ["--text", "def add(a, b): return a + b"]
    args = _parse(argv)
    results = args.func(args)
    expected = [
        "load_heatmap_all.png",
        "load_heatmap_domain_math.png",
        "load_heatmap_domain_story.png",
        "load_heatmap_domain_code.png",
        "domain_specialisation.png",
        "token_routing_layer1.png",
        "output_norm_vs_score_layer1.png",
        "ablations.png",
        "expert_similarity_layer1.png",
        "router_alignment.png",
        "analysis.json",
        "report.md",
    ]
    assert sorted(results["files"]) == sorted(expected)
    for name in expected:
        path = output / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    analysis = json.loads((output / "analysis.json").read_text())
    assert analysis["data"]["domains"] == {"math": 5, "story": 5, "code": 3}
    assert analysis["layer"] == 1 and analysis["routing"]["layers"] == [1, 2]
    assert [row["variant"] for row in analysis["ablations"]["rows"]] == ["top_per_token", "random_experts"]
    assert len(analysis["ablations"]["shared"]) == 2
    assert analysis["token_routing"]["tokens"][0].startswith("<")  # BOS
    assert set(analysis["static"]["layers"]) == {"1", "2"}
    report = (output / "report.md").read_text()
    for heading in ("## Load balance", "## Domains", "## Ablations", "## Static analyses", "## Expert output norm"):
        assert heading in report


def test_cli_rejects_bad_arguments_before_loading_the_model(saved_model, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("some text\n")
    with pytest.raises(ValueError, match="Layer 0 is not a MoE layer"):
        args = _parse(["analyze", str(saved_model), "--data", str(data), "--layer", "0"])
        args.func(args)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        args = _parse(["analyze", str(saved_model), "--data", str(tmp_path / "nope.txt")])
        args.func(args)
    with pytest.raises(ValueError, match="disables no expert"):
        args = _parse(["analyze", str(saved_model), "--data", str(data), "--ablation_ratios", "1/32"])
        args.func(args)


def test_cli_passes_4bit_quantization_and_dtype_to_from_pretrained(monkeypatch):
    import transformers

    from deepseekmoe.eval.analysis.cli import _load_model

    captured = {}
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda path, **kwargs: captured.update(kwargs)
    )
    _load_model(_parse(["analyze", "some/model", "--data", "x.txt", "--load_in_4bit", "--dtype", "bfloat16"]))
    assert isinstance(captured["quantization_config"], transformers.BitsAndBytesConfig)
    assert captured["quantization_config"].load_in_4bit and captured["dtype"] is torch.bfloat16


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
def test_analyses_run_on_a_4bit_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from modeling_deepseekmoe.checkpoint import write_random_released_checkpoint

    directory = write_random_released_checkpoint(tiny_config(), tmp_path / "ckpt", dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(directory).eval()
    quantized = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    ).eval()
    samples = [EncodedSample(tuple(range(2, 20)), "d"), EncodedSample(tuple(range(30, 41)), "e")]
    statistics, loss = collect_routing_statistics(quantized, samples, progress=False)
    assert statistics.tokens.tolist() == [29, 29] and statistics.counts.sum() == 29 * 3 * 2  # top-3, 2 layers
    with disable_experts(quantized, {1: statistics.top_experts(1)[:1]}):
        assert evaluate_loss(quantized, samples, progress=False).loss != loss.loss
    # Dequantized nf4 weights (routed experts and shared slices) keep the geometry of the full-precision ones.
    quantized_static, dense_static = static_analysis(quantized, detail_layer=1), static_analysis(dense, detail_layer=1)
    assert quantized_static["detail"]["labels"] == dense_static["detail"]["labels"]
    assert len(dense_static["detail"]["labels"]) == 10  # 8 routed + 2 shared slices
    torch.testing.assert_close(
        torch.tensor(quantized_static["detail"]["similarity"]["all"]),
        torch.tensor(dense_static["detail"]["similarity"]["all"]),
        atol=0.05,
        rtol=0,
    )
    collector = OutputNormCollector(layers=[2], max_tokens=8)
    run_data_pass(quantized, samples, collectors=[collector], compute_loss=False, progress=False)
    assert collector.summary(2)["tokens"] == 8
