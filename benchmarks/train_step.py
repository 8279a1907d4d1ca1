"""Training speed and memory of LoRA and QLoRA fine-tuning at the 16B config, through the project's SFT path
(`DeepseekMoESFTTrainer`, TRL's fused LM head, PEFT, gradient checkpointing, bf16).

    python benchmarks/train_step.py                              # 16B config, random bf16 weights, on the GPU
    python benchmarks/train_step.py --tiny --device cpu          # a quick run of the code path on CPU

The 16B checkpoint is random weights written in the released layout on the machine that runs the benchmark
(`write_random_released_checkpoint`, ~33 GB in `--checkpoint_dir`, reused when present), loaded back through
`from_pretrained` exactly as a downloaded checkpoint would be (4-bit with quantized experts for QLoRA).
Reported per mode: training tokens/s (all tokens of a step / step time, after warm-up steps) and peak GPU memory
(`torch.cuda.max_memory_allocated`, weights included). Without a GPU (and without `--device cpu`) it skips.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from transformers import TrainerCallback

from deepseekmoe.finetune.sft import DeepseekSFTConfig, ModelArguments, build_peft_config, load_model
from deepseekmoe.finetune.trainer import DeepseekMoESFTTrainer
from modeling_deepseekmoe import DeepseekMoEConfig
from modeling_deepseekmoe.checkpoint import write_random_released_checkpoint
from modeling_deepseekmoe.tokenization import build_tokenizer


RESULTS = Path(__file__).resolve().parent / "results"


class StepTimer(TrainerCallback):
    def __init__(self, device: str):
        self.device, self.starts, self.seconds = device, [], []

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.seconds.append(time.perf_counter() - self.starts[-1])


def tiny_config() -> DeepseekMoEConfig:
    return DeepseekMoEConfig(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3, n_routed_experts=16,
        num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, bos_token_id=0,
        eos_token_id=1,
    )  # fmt: skip


def ensure_checkpoint(config: DeepseekMoEConfig, directory: Path) -> Path:
    if not (directory / "config.json").is_file():
        start = time.perf_counter()
        write_random_released_checkpoint(config, directory, dtype=torch.bfloat16)
        print(f"Wrote random released-layout weights to {directory} in {time.perf_counter() - start:.0f} s")
    return directory


def run_mode(mode: str, checkpoint: Path, config: DeepseekMoEConfig, args) -> dict:
    device_is_cpu = args.device == "cpu"
    model_args = ModelArguments(
        model_name_or_path=str(checkpoint),
        dtype="bfloat16",
        use_peft=True,
        load_in_4bit=mode == "qlora",
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_target_modules=args.lora_target_modules,
        experts_implementation=args.experts_implementation,
    )
    output_dir = tempfile.mkdtemp(prefix=f"train_step_{mode}_")
    training_args = DeepseekSFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=1e-4,
        logging_steps=args.warmup_steps + args.steps,
        save_strategy="no",
        bf16=True,
        use_cpu=device_is_cpu,
        gradient_checkpointing=True,
        max_length=args.seq_len,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    generator = torch.Generator().manual_seed(0)
    rows = args.batch_size * (args.warmup_steps + args.steps)
    ids = torch.randint(2, min(config.vocab_size, 100000), (rows, args.seq_len), generator=generator).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    load_start = time.perf_counter()
    model = load_model(model_args, training_args)
    load_seconds = time.perf_counter() - load_start
    timer = StepTimer(args.device)
    trainer = DeepseekMoESFTTrainer(
        model,
        training_args,
        train_dataset=dataset,
        processing_class=build_tokenizer(512),
        peft_config=build_peft_config(model_args),
        callbacks=[timer],
    )
    trainer.train()
    measured = timer.seconds[args.warmup_steps :]
    step_seconds = sum(measured) / len(measured)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "mode": mode,
        "lora_target_modules": args.lora_target_modules,
        "lora_r": args.lora_r,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": args.batch_size * args.seq_len,
        "step_seconds": round(step_seconds, 4),
        "tokens_per_s": round(args.batch_size * args.seq_len / step_seconds, 1),
        "trainable_params": trainable,
        "load_seconds": round(load_seconds, 1),
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
    }
    if args.device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    del trainer, model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    parser.add_argument("--modes", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    parser.add_argument("--lora_target_modules", nargs="+", default=["all"])
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--experts_implementation", default=None)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a small toy config instead of the 16B one")
    parser.add_argument("--checkpoint_dir", default=None, help="where the random 16B checkpoint is written / reused")
    parser.add_argument("--output", default=None, help="results JSON (default: results/train_step_<device>.json)")
    args = parser.parse_args()
    if args.device is None or (args.device == "cuda" and not torch.cuda.is_available()):
        print(
            "No CUDA GPU: skipped the LoRA / QLoRA training-step benchmark (a GPU benchmark at the 16B config; "
            "`--tiny --device cpu` runs the code path)."
        )
        return

    config = tiny_config() if args.tiny else DeepseekMoEConfig()
    default_dir = Path(tempfile.gettempdir()) / ("deepseekmoe-tiny-random" if args.tiny else "deepseekmoe-16b-random")
    checkpoint = ensure_checkpoint(config, Path(args.checkpoint_dir or default_dir))
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    report = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": "tiny" if args.tiny else "deepseek-moe-16b (random bf16 weights, released layout)",
        "results": [],
    }
    for mode in args.modes:
        try:
            result = run_mode(mode, checkpoint, config, args)
        except Exception as err:  # record a failing mode and measure the others
            result = {"mode": mode, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        print(json.dumps(result))
        report["results"].append(result)
    slug = "cpu_tiny" if args.tiny else device.lower().replace(" ", "_")
    output = Path(args.output) if args.output else RESULTS / f"train_step_{slug}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Results written to {output}")


if __name__ == "__main__":
    main()
