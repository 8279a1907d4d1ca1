"""The built-in demo: a tiny random DeepSeekMoE saved in the released layout, loaded back through
`AutoModelForCausalLM`, generating text through the chat template and showing which experts each token used."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_deepseekmoe import DeepseekMoEConfig, DeepseekMoEForCausalLM
from modeling_deepseekmoe.checkpoint import checkpoint_tensor_files, validate_checkpoint
from modeling_deepseekmoe.tokenization import build_tokenizer


@dataclass
class DemoResult:
    model_dir: Path
    checkpoint_files: list[str]
    num_tensors: int
    prompt: str
    completion: str
    prompt_tokens: int
    routing: list[dict]  # one entry per token: {"token": str, "experts": {layer: [expert ids]}}


def demo_config(tokenizer_size: int) -> DeepseekMoEConfig:
    """The released structure at toy size: a dense first layer, then MoE layers of 2 shared + 16 routed experts
    (top-4); the embedding is padded beyond the tokenizer, as the released one (102400 rows for 100015 tokens)."""
    return DeepseekMoEConfig(
        vocab_size=(tokenizer_size + 63) // 64 * 64,
        hidden_size=64,
        intermediate_size=192,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        n_shared_experts=2,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        max_position_embeddings=512,
        bos_token_id=tokenizer_size - 2,
        eos_token_id=tokenizer_size - 1,
    )


def token_routing(model, input_ids: torch.Tensor) -> list[dict[int, list[int]]]:
    """For each token of a single sequence, the routed experts it used in every MoE layer."""
    with torch.no_grad():
        router_logits = model(input_ids, output_router_logits=True, use_cache=False).router_logits
    moe_layers = model.config.moe_layer_indices
    top_k = model.config.num_experts_per_tok
    chosen = [logits.topk(top_k, dim=-1).indices.sort(dim=-1).values.tolist() for logits in router_logits]
    return [{layer: chosen[i][t] for i, layer in enumerate(moe_layers)} for t in range(input_ids.shape[1])]


def run_demo(
    output_dir: str | Path = "deepseekmoe-demo",
    seed: int = 0,
    prompt: str = "What do the experts of a mixture-of-experts model do?",
    max_new_tokens: int = 24,
) -> DemoResult:
    output_dir = Path(output_dir)
    model_dir = output_dir / "tiny-deepseekmoe"
    tokenizer = build_tokenizer(vocab_size=512, save_directory=model_dir)
    torch.manual_seed(seed)
    model = DeepseekMoEForCausalLM(demo_config(len(tokenizer)))
    model.apply_generation_defaults(tokenizer_size=len(tokenizer))
    model.save_pretrained(model_dir, max_shard_size="1MB")
    validate_checkpoint(model_dir, model.config)
    files = checkpoint_tensor_files(model_dir)

    loaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    generated = loaded.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    completion = tokenizer.decode(generated[0, input_ids.shape[1] :], skip_special_tokens=False)
    routing = [
        {"token": tokenizer.decode([token_id]), "experts": experts}
        for token_id, experts in zip(generated[0].tolist(), token_routing(loaded, generated))
    ]
    (output_dir / "routing.json").write_text(json.dumps(routing, ensure_ascii=False, indent=1))
    return DemoResult(
        model_dir, sorted(set(files.values())), len(files), prompt, completion, input_ids.shape[1], routing
    )


def format_demo(result: DemoResult, max_tokens: int = 40) -> str:
    lines = [
        f"Saved a tiny random DeepSeekMoE in the released layout: {result.model_dir}",
        f"  {result.num_tensors} tensors (one per expert projection) in {len(result.checkpoint_files)} shard(s) "
        "+ model.safetensors.index.json, config.json (model_type 'deepseek')",
        "Loaded it back with AutoModelForCausalLM (native classes, no remote code).",
        f"Prompt: {result.prompt!r}",
        f"Generated (random weights, so the text is noise): {result.completion!r}",
        "",
        "Routed experts of each generated token (layer: experts):",
    ]
    generated = result.routing[result.prompt_tokens :]
    for entry in generated[:max_tokens]:
        experts = "  ".join(f"L{layer}:{','.join(map(str, ids))}" for layer, ids in entry["experts"].items())
        lines.append(f"  {entry['token']!r:>14}  {experts}")
    lines.append(f"Routing of every token (prompt included): {result.model_dir.parent / 'routing.json'}")
    return "\n".join(lines)
