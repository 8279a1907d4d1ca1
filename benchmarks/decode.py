"""Batch-1 decode speed of the full model: `StaticCache` + `torch.compile` (transformers' generate compiles the decode
step when the cache is static), against the memory-bandwidth bound of the device.

    python benchmarks/decode.py --device cuda --bandwidth_tb_s 3.35      # 16B config, random bf16 weights
    python benchmarks/decode.py --device cpu --tiny --no_compile         # a quick run of the code path on CPU

The bound: every decoded token reads the activated weights once (attention, dense/shared/6 routed experts, router,
norms, lm_head: ~2.6B parameters at the 16B config, bf16) so tokens/s <= bandwidth / activated bytes.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from modeling_deepseekmoe import DeepseekMoEConfig, DeepseekMoEForCausalLM


def activated_parameters(config: DeepseekMoEConfig) -> int:
    """Weights read for one token: everything except the unchosen routed experts and the embedding table."""
    hidden, expert = config.hidden_size, 3 * config.hidden_size * config.moe_intermediate_size
    attention = 2 * hidden * config.num_attention_heads * config.head_dim + 2 * hidden * (
        config.num_key_value_heads * config.head_dim
    )
    total = config.vocab_size * hidden  # lm_head (the embedding row read is negligible)
    for layer in range(config.num_hidden_layers):
        total += attention + 2 * hidden
        if config.is_moe_layer(layer):
            total += config.num_experts_per_tok * expert + config.n_routed_experts * hidden
            total += (config.n_shared_experts or 0) * expert
        else:
            total += 3 * hidden * config.intermediate_size
    return total


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bandwidth_tb_s", type=float, default=None, help="device memory bandwidth, for the bound")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy config instead of the 16B one")
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: skipped the decode measurement (it is a GPU benchmark).")
        return

    config = DeepseekMoEConfig()
    if args.tiny:
        config = DeepseekMoEConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
                                   num_hidden_layers=2, vocab_size=1024, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = DeepseekMoEForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.cache_implementation = "static"
    model.generation_config.eos_token_id = None  # decode exactly new_tokens
    if args.no_compile:
        model.generation_config.compile_config = None
        model.generation_config.disable_compile = True
    prompt = torch.randint(0, 1000, (1, args.prompt_tokens), device=args.device)
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    model.generate(prompt, **{**generate, "max_new_tokens": 16, "min_new_tokens": 16})  # warm-up and compile
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, **generate)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = args.new_tokens / seconds
    weight_bytes = 2 * activated_parameters(config)
    result = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": "tiny" if args.tiny else "deepseek-moe-16b (random bf16 weights)",
        "compile": not args.no_compile,
        "new_tokens": args.new_tokens,
        "tokens_per_s": round(tokens_per_s, 1),
        "activated_weight_bytes_per_token": weight_bytes,
    }
    if args.bandwidth_tb_s:
        bound = args.bandwidth_tb_s * 1e12 / weight_bytes
        result.update(bound_tokens_per_s=round(bound, 1), fraction_of_bound=round(tokens_per_s / bound, 3))
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
