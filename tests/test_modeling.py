import pytest
import torch
from transformers import AutoModelForSequenceClassification, DynamicCache, StaticCache

from modeling_deepseekmoe import DeepseekMoEForCausalLM, DeepseekMoEForSequenceClassification
from modeling_deepseekmoe.modeling_deepseekmoe import CACHE_NAME, DeepseekMoESparseMoeBlock

from conftest import tiny_config


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return DeepseekMoEForCausalLM(tiny_config(**overrides)).eval()


def random_ids(batch, length, vocab=96, seed=1):
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_layer_structure_follows_config():
    model = make_model()
    assert not isinstance(model.model.layers[0].mlp, DeepseekMoESparseMoeBlock)
    moe = model.model.layers[1].mlp
    assert isinstance(moe, DeepseekMoESparseMoeBlock)
    assert tuple(moe.experts.gate_up_proj.shape) == (8, 32, 32)
    assert tuple(moe.experts.down_proj.shape) == (8, 32, 16)
    assert moe.shared_experts.gate_proj.weight.shape == (32, 32)
    # The router is a bare parameter, not nn.Linear (quantizers and all-linear LoRA must skip it).
    assert not isinstance(moe.gate, torch.nn.Linear) and tuple(moe.gate.weight.shape) == (8, 32)


@pytest.mark.parametrize("overrides", [dict(n_shared_experts=0), dict(n_routed_experts=None, num_experts_per_tok=None)])
def test_variants_without_shared_or_routed_experts_run(overrides):
    model = make_model(**overrides)
    out = model(random_ids(2, 5), labels=random_ids(2, 5), output_router_logits=True)
    assert torch.isfinite(out.loss)


def test_logits_are_fp32_and_router_runs_in_activation_dtype():
    model = make_model().to(torch.bfloat16)
    out = model(random_ids(1, 6), output_router_logits=True)
    assert out.logits.dtype == torch.float32
    assert all(logits.dtype == torch.bfloat16 for logits in out.router_logits)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (6, 8)


def test_sdpa_and_eager_attention_agree():
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = make_model()
        model.set_attn_implementation(implementation)
        logits[implementation] = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits["eager"][1], logits["sdpa"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["eager"][0, 3:], logits["sdpa"][0, 3:], atol=1e-5, rtol=1e-5)


def test_generate_with_cache_equals_without_cache():
    model = make_model()
    prompt = random_ids(2, 5)
    with_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    without_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)


def test_static_cache_generation_equals_dynamic_cache():
    model = make_model()
    prompt = random_ids(1, 5)
    dynamic = model.generate(prompt, max_new_tokens=6, do_sample=False)
    static = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)
    cache = StaticCache(config=model.config, max_cache_len=16)
    out = model(prompt, cache=cache, use_cache=True)
    torch.testing.assert_close(out.logits, model(prompt).logits, atol=1e-5, rtol=1e-5)


def test_cache_is_read_under_both_names_and_generate_warns_about_neither(recwarn, caplog):
    """`cache` (transformers >= 5.24) and `past_key_values` (before) both reach the attention layers; generating and
    the forward's own calls (create_causal_mask) print no deprecation on the installed release."""
    model = make_model()
    prompt, step = random_ids(1, 5), random_ids(1, 1, seed=7)
    full = model(torch.cat([prompt, step], dim=1)).logits[:, -1]
    for name in ("cache", "past_key_values"):
        first = model(prompt, use_cache=True)
        past = getattr(first, CACHE_NAME)
        assert past is not None and past.get_seq_length() == 5
        out = model(step, use_cache=True, **{name: past})
        torch.testing.assert_close(out.logits[:, -1], full, atol=1e-5, rtol=1e-5)
        assert getattr(out, CACHE_NAME).get_seq_length() == 6
    recwarn.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="transformers"):
        model.generate(prompt, max_new_tokens=3, do_sample=False)
        model(prompt, use_cache=True, cache=DynamicCache(config=model.config))
    messages = [str(w.message) for w in recwarn] + [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "past_key_values" in m or "deprecated" in m.lower()], messages


def test_left_padded_batch_equals_unpadded_rows():
    model = make_model()
    short, long = random_ids(1, 4, seed=3), random_ids(1, 7, seed=4)
    pad = model.generation_config.pad_token_id
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], dim=1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)], 1),
                      torch.ones(1, 7, dtype=torch.long)])
    padded = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone_short = model.generate(short, max_new_tokens=6, do_sample=False)
    alone_long = model.generate(long, max_new_tokens=6, do_sample=False)
    assert torch.equal(padded[0, 3:], alone_short[0])
    assert torch.equal(padded[1], alone_long[0])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(logits[0, 3:], model(short).logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_documents_attend_only_within_themselves(implementation):
    model = make_model()
    model.set_attn_implementation(implementation)
    first, second = random_ids(1, 5, seed=5), random_ids(1, 6, seed=6)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(6)])[None]
    # As in training (no cache), transformers' masking then separates the documents.
    logits = model(packed, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(logits[:, :5], model(first).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 5:], model(second).logits, atol=1e-5, rtol=1e-5)


def grads_of(model, ids, **kwargs):
    model.zero_grad()
    model(ids, labels=ids, **kwargs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 8)
    model = make_model().train()
    reference = grads_of(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads_of(model, ids)
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


def independent_aux_loss(model, ids, position_ids=None, attention_mask=None, ignore_padding=False):
    """Balance loss from the paper's formula (Eq. 12-14), by explicit loops over layers, groups and experts.
    A group is a sequence (`seq_aux`), a packed document, or the whole batch; masked tokens are left out."""
    config = model.config
    gates = [layer.mlp.gate for layer in model.model.layers if isinstance(layer.mlp, DeepseekMoESparseMoeBlock)]
    inputs = []
    hooks = [gate.register_forward_hook(lambda module, args, out: inputs.append(args[0])) for gate in gates]
    model(ids, position_ids=position_ids, attention_mask=attention_mask)
    for hook in hooks:
        hook.remove()
    n_experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    batch, length = ids.shape
    if not config.seq_aux:
        groups = [[(b, t) for b in range(batch) for t in range(length)]]
    elif position_ids is not None:
        starts = [t for t in range(length) if position_ids[0, t] == 0] + [length]
        groups = [[(0, t) for t in range(s, e)] for s, e in zip(starts[:-1], starts[1:])]
    else:
        groups = [[(b, t) for t in range(length)] for b in range(batch)]
    if ignore_padding:
        groups = [[(b, t) for b, t in group if attention_mask[b, t]] for group in groups]
    total = 0.0
    for gate, layer_input in zip(gates, inputs):
        scores = torch.softmax(layer_input @ gate.weight.T, dim=-1).view(batch, length, n_experts)
        chosen = torch.topk(scores, top_k, dim=-1).indices
        per_group = []
        for group in groups:
            value = 0.0
            for expert in range(n_experts):
                hits = sum(int((chosen[b, t] == expert).sum()) for b, t in group)
                f = n_experts / (top_k * len(group)) * hits
                p = sum(float(scores[b, t, expert].detach()) for b, t in group) / len(group)
                value += f * p
            per_group.append(value)
        total += sum(per_group) / len(per_group)
    return config.aux_loss_alpha * total


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_value_matches_an_independent_computation(seq_aux):
    model = make_model(aux_loss_alpha=0.01, seq_aux=seq_aux)
    ids = random_ids(3, 7)
    out = model(ids, output_router_logits=True)
    assert out.aux_loss.item() == pytest.approx(independent_aux_loss(model, ids), rel=1e-5)


def test_aux_loss_is_per_document_for_packed_sequences():
    model = make_model(aux_loss_alpha=0.01)
    packed = random_ids(1, 11)
    position_ids = torch.cat([torch.arange(4), torch.arange(7)])[None]
    out = model(packed, position_ids=position_ids, output_router_logits=True)
    expected = independent_aux_loss(model, packed, position_ids=position_ids)
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.aux_loss.item() != pytest.approx(model(packed, output_router_logits=True).aux_loss.item(), rel=1e-3)


def test_aux_loss_counts_padding_by_default_and_can_ignore_it():
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    model = make_model(aux_loss_alpha=0.01)
    counted = model(ids, attention_mask=mask, output_router_logits=True).aux_loss.item()
    assert counted == pytest.approx(independent_aux_loss(model, ids, attention_mask=mask), rel=1e-5)
    model.config.aux_loss_ignore_padding = True
    ignored = model(ids, attention_mask=mask, output_router_logits=True).aux_loss.item()
    assert ignored == pytest.approx(independent_aux_loss(model, ids, attention_mask=mask, ignore_padding=True), rel=1e-5)
    assert ignored != pytest.approx(counted, rel=1e-4)


def test_aux_loss_enters_the_gradient_exactly_once():
    ids = random_ids(2, 8)
    model = make_model(aux_loss_alpha=0.05).train()
    out = model(ids, labels=ids, output_router_logits=True)
    assert out.loss.item() == pytest.approx(make_model(aux_loss_alpha=0.0).train()(ids, labels=ids).loss.item())
    out.loss.backward()
    injected = {n: p.grad.clone() for n, p in model.named_parameters()}
    # Expected: d(cross-entropy)/dW + d(aux_loss)/dW, the aux value being a differentiable function of the routers.
    model.zero_grad()
    out = model.eval()(ids, labels=ids, output_router_logits=True)  # reports aux_loss without injecting it
    model.train()
    model.config.aux_loss_alpha, alpha = 0.0, model.config.aux_loss_alpha
    plain = model(ids, labels=ids, output_router_logits=True)
    model.config.aux_loss_alpha = alpha
    (plain.loss + out.aux_loss).backward()
    for name, grad in injected.items():
        model_grad = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(grad, model_grad, atol=1e-7, rtol=1e-4, msg=name)
    router = model.model.layers[1].mlp.gate.weight
    assert injected["model.layers.1.mlp.gate.weight"].abs().sum() > 0 and router.grad is not None


def test_aux_loss_alpha_zero_trains_and_reports_zero():
    model = make_model(aux_loss_alpha=0.0).train()
    ids = random_ids(2, 6)
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert out.aux_loss.item() == 0.0


def test_aux_loss_is_not_injected_in_eval_mode():
    ids = random_ids(2, 6)
    with_alpha = grads_of(make_model(aux_loss_alpha=0.5).eval(), ids)
    without = grads_of(make_model(aux_loss_alpha=0.0).eval(), ids)
    for name in with_alpha:
        torch.testing.assert_close(with_alpha[name], without[name], msg=name)


def test_rope_linear_scaling_divides_positions():
    scaled = make_model(rope_scaling={"type": "linear", "factor": 2.0}).model.rotary_emb
    plain = make_model().model.rotary_emb
    x = torch.zeros(1)
    cos_scaled, _ = scaled(x, torch.tensor([[0, 2, 4]]))
    cos_plain, _ = plain(x, torch.tensor([[0, 1, 2]]))
    torch.testing.assert_close(cos_scaled, cos_plain)


def test_rope_dynamic_scaling_only_beyond_trained_context():
    dynamic = make_model(rope_scaling={"type": "dynamic", "factor": 2.0}).model.rotary_emb
    plain = make_model().model.rotary_emb
    x = torch.zeros(1)
    inside = torch.arange(64)[None]
    torch.testing.assert_close(dynamic(x, inside)[0], plain(x, inside)[0])
    beyond = torch.arange(100)[None]
    assert not torch.allclose(dynamic(x, beyond)[0], plain(x, beyond)[0])


def test_sequence_classification_through_auto_class(tmp_path):
    config = tiny_config(num_labels=3, pad_token_id=1)
    torch.manual_seed(0)
    DeepseekMoEForCausalLM(config).save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3, pad_token_id=1)
    assert isinstance(model, DeepseekMoEForSequenceClassification)
    out = model(random_ids(2, 5), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


def test_generation_defaults_pad_is_eos_and_ids_past_tokenizer_never_generated():
    model = make_model()
    assert model.generation_config.pad_token_id == model.config.eos_token_id
    def favour_padding_ids(module, args, logits):
        return logits + torch.cat([torch.zeros(90), torch.full((6,), 100.0)])

    model.lm_head.register_forward_hook(favour_padding_ids)
    assert model(random_ids(1, 4)).logits[0, -1].argmax() >= 90
    model.apply_generation_defaults(tokenizer_size=90)
    generated = model.generate(random_ids(1, 4), max_new_tokens=5, do_sample=False)
    assert generated[0, 4:].max() < 90


def test_released_vocab_suppresses_padding_ids_by_default():
    config = tiny_config(vocab_size=102400, bos_token_id=100000, eos_token_id=100001, hidden_size=8,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=8, moe_intermediate_size=4,
                         num_hidden_layers=2)
    model = DeepseekMoEForCausalLM(config)
    assert model.generation_config.suppress_tokens == list(range(100015, 102400))
    assert model.generation_config.pad_token_id == 100001


def test_suppressed_ids_are_masked_as_transformers_does_and_never_generated():
    from transformers.generation.logits_process import SuppressTokensLogitsProcessor

    model = make_model().eval()
    model.apply_generation_defaults(tokenizer_size=80)
    processors = model._get_logits_processor(
        generation_config=model.generation_config, input_ids_seq_length=4, encoder_input_ids=None,
        prefix_allowed_tokens_fn=None, logits_processor=None,
    )  # fmt: skip
    suppress = [p for p in processors if isinstance(p, SuppressTokensLogitsProcessor)]
    assert len(suppress) == 1 and type(suppress[0]) is not SuppressTokensLogitsProcessor
    scores = torch.randn(3, 96)
    expected = SuppressTokensLogitsProcessor(range(80, 96))(None, scores)
    assert torch.equal(suppress[0](None, scores), expected)
    assert torch.equal(suppress[0](None, scores), expected)  # the cached mask
    with torch.no_grad():
        generated = model.generate(random_ids(2, 4), max_new_tokens=6, do_sample=False)
    assert generated[:, 4:].max() < 80


def test_resize_token_embeddings_refuses_to_shrink():
    model = make_model()
    with pytest.raises(ValueError, match="would shrink the embedding from 96"):
        model.resize_token_embeddings(90)
    model.resize_token_embeddings(100)
    assert model.get_input_embeddings().weight.shape[0] == 100
    model.resize_token_embeddings(90, allow_shrink=True)
    assert model.config.vocab_size == 90


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_default_experts_path_matches_cpu_reference():
    model = make_model()
    ids = random_ids(2, 16)
    expected = model(ids).logits
    model.to("cuda")
    assert model.config._experts_implementation == "auto"
    torch.testing.assert_close(model(ids.cuda()).logits.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_gpu_default_path_traces_as_one_graph_without_host_syncs(training):
    """`grouped_mm` (the CUDA default) must have no `.item()`/`.tolist()`/data-dependent Python on the token path:
    dynamo's fullgraph tracing fails on any of them. Traced on CPU with the eager backend, training (aux loss
    injection included) and inference."""
    model = make_model(aux_loss_alpha=0.01, experts_implementation="grouped_mm").train(training)
    ids = random_ids(2, 8)
    expected = model(ids, labels=ids, use_cache=False, output_router_logits=True)  # installs the output hooks
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out = compiled(ids, labels=ids, use_cache=False, output_router_logits=True)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss)
    if training:
        out.loss.backward()
        assert model.model.layers[1].mlp.experts.gate_up_proj.grad is not None


def test_moe_layers_expose_the_injected_aux_value_for_trainers():
    model = make_model(aux_loss_alpha=0.01).train()
    ids = random_ids(2, 8)
    out = model(ids, labels=ids, output_router_logits=True)
    blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, DeepseekMoESparseMoeBlock)]
    assert sum(block.last_aux_loss for block in blocks).item() == pytest.approx(out.aux_loss.item(), rel=1e-6)
