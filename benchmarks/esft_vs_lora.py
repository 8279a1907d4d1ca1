"""ESFT vs LoRA vs full fine-tuning on a tiny DeepSeekMoE, through the shipped trainer: the ESFT paper's comparison
(arXiv 2407.01906, Tables 1, 2 and 4, Fig. 5) at toy scale, on one CPU thread.

    python benchmarks/esft_vs_lora.py                      # the full run: writes benchmarks/results/esft_vs_lora.json,
                                                           # then renders benchmarks/esft_vs_lora.md and the plot
    python benchmarks/esft_vs_lora.py --setting smallest   # the seconds-long run the test uses
    python benchmarks/esft_report.py                       # re-render the report from the JSON alone

1. Pre-train a tiny DeepSeekMoE (`synthetic.tiny_moe_config`) from scratch on five synthetic domains
   (`synthetic.KNOWLEDGE_DOMAINS`: arithmetic, reversal, key_value, text and "facts", a fixed table of 200 made-up
   `the code of <name> is <NN>` facts), with the balance loss, until routing specialises by domain.
2. Two target tasks whose new knowledge is a memorised mapping (what feed-forward / expert weights store), each in a
   domain the base already routes to its own experts:
   - `new_facts`: 100 facts about names the model has never seen, in the facts domain's format (a new table per seed);
   - `new_operator`: a new arithmetic operator, the digit multiplication table `7x3=21` (100 pairs), beside the
     pre-training's `a+b=`.
   Target score: greedy exact match over the task's table (recall of the trained knowledge, as for new facts).
3. For each task and seed, one training file (steps x batch rows drawn from the table) used by every method, the same
   steps, batch, LR schedule and seed: FFT and LoRA through `finetune.sft.run_sft`, ESFT through
   `finetune.esft.scoring.score_experts` (probe: the training file's answer tokens) -> `selection.select_experts` ->
   `finetune.esft.train.run_esft`. Diagnostics through `run_esft` too: random experts (ESFT-Token's count per layer)
   and all routed experts.
4. LR: the grid `LR_GRID`, fixed before any run; per task and method the LR with the lowest target answer loss on
   seed 0 is kept for seeds 1 and 2 (diagnostics use ESFT-Token's). Forgetting: held-out loss of every pre-training
   domain after minus before.

The JSON holds every number; everything but its "timings" is the same on every run (one CPU thread, fixed seeds).
"""

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS_PATH = HERE / "results" / "esft_vs_lora.json"
COMMAND = "python benchmarks/esft_vs_lora.py"
METHODS = ("FFT", "LoRA", "ESFT-Token", "ESFT-Gate")
RANDOM_EXPERTS, ALL_EXPERTS = "Random experts", "All routed experts"
DIAGNOSTICS = (RANDOM_EXPERTS, ALL_EXPERTS)
ESFT_SETTINGS = {"ESFT-Token": ("token", 0.2), "ESFT-Gate": ("gate", 0.1)}
# Fixed before the final run (see the report's Protocol, which also describes the pilot run that trimmed it to fit the
# time budget). The paper's LRs (FFT 3e-5, LoRA 1e-4, ESFT 1e-5 on a 16B model, 500 steps) are far too small for a
# 0.5M-parameter model trained for 100 steps; the grids keep the paper's ordering (LoRA and ESFT above FFT).
LR_GRID = {
    "FFT": (1e-3, 3e-3),
    "LoRA": (3e-3, 1e-2),
    "ESFT-Token": (3e-3, 1e-2),
    "ESFT-Gate": (3e-3, 1e-2),
}
PRETRAIN_SEED, HELDOUT_SEED, NEW_FACTS_SEED = 0, 10_003, 20_000


@dataclass
class Setting:
    pretrain_steps: int
    adapt_steps: int
    batch_size: int
    seeds: tuple[int, ...]
    lr_grid: dict[str, tuple[float, ...]]
    table_size: int = 100  # new facts per seed
    heldout_per_domain: int = 100
    probe_sequences: int = 16
    probe_length: int = 256
    tasks: tuple[str, ...] = ("new_facts", "new_operator")


SETTINGS = {
    "full": Setting(pretrain_steps=1500, adapt_steps=100, batch_size=32, seeds=(0, 1, 2), lr_grid=LR_GRID),
    "smallest": Setting(pretrain_steps=20, adapt_steps=3, batch_size=8, seeds=(0,),
                        lr_grid={method: grid[-1:] for method, grid in LR_GRID.items()}, table_size=16,
                        heldout_per_domain=8, probe_sequences=2, probe_length=64),
}


# --------------------------------------------------------------------------------------------------------------------
# Tasks


def task_table(task: str, seed: int, size: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a target task for a seed."""
    from deepseekmoe.finetune.synthetic import fact_pair, fact_table, pretrain_facts, product_table

    if task == "new_facts":
        table = fact_table(size, NEW_FACTS_SEED + seed, exclude=set(pretrain_facts()))
        return [fact_pair(name, code) for name, code in table.items()]
    if task == "new_operator":
        return product_table()[:size] if size < 100 else product_table()
    raise ValueError(f"Unknown task {task!r}; use new_facts or new_operator.")


def write_training_file(path: Path, table: list[tuple[str, str]], rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    drawn = [table[rng.randrange(len(table))] for _ in range(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in drawn))
    return path


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


def _batch(tokenizer, pairs: list[tuple[str, str]], with_answer: bool):
    """Left-padded batch of prompts (+ answer + EOS); labels on the answer tokens + EOS."""
    rows = []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(prompt + answer)["input_ids"][len(prompt_ids):] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + answer_ids, len(prompt_ids)) if with_answer else (prompt_ids, len(prompt_ids)))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, prompt_length) in enumerate(rows):
        start = length - len(ids)
        input_ids[i, start:] = torch.tensor(ids)
        attention_mask[i, start:] = 1
        labels[i, start + prompt_length:] = torch.tensor(ids[prompt_length:])
    return input_ids, attention_mask, labels


@torch.no_grad()
def target_scores(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 128) -> dict:
    """Greedy exact match and answer loss (answer tokens + EOS) over a task's table."""
    model.eval()
    hits, total_loss, tokens = 0, 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        input_ids, attention_mask, labels = _batch(tokenizer, chunk, with_answer=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        total_loss += loss.item()
        tokens += int((targets != -100).sum())
        input_ids, attention_mask, _ = _batch(tokenizer, chunk, with_answer=False)
        generated = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        texts = tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)
        hits += sum(text.strip() == answer.strip() for text, (_, answer) in zip(texts, chunk))
    return {"exact_match": hits / len(pairs), "answer_loss": total_loss / tokens}


def routing_usage(model, tokenizer, texts: list[str]) -> dict[str, list[float]]:
    """ESFT-Token scores (share of routed slots per expert, per MoE layer) over unpacked texts, all tokens."""
    from deepseekmoe.finetune.esft.scoring import score_experts

    sequences = []
    for text in texts:
        ids = tokenizer(text + tokenizer.eos_token)["input_ids"]
        sequences.append({"input_ids": torch.tensor(ids), "score_mask": torch.ones(len(ids), dtype=torch.long)})
    return {str(layer): values for layer, values in score_experts(model, sequences, show_progress=False).token.items()}


def folder_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def training_state_bytes(trainer) -> dict:
    """Weights + gradients + AdamW state of a finished run, counted from the live model and optimizer."""
    model = trainer.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    optimizer_state = sum(value.numel() * value.element_size() for state in trainer.optimizer.state.values()
                          for value in state.values() if torch.is_tensor(value) and value.dim() > 0)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer_state,
            "total": weights + gradients + optimizer_state}


# --------------------------------------------------------------------------------------------------------------------
# Runs (through the shipped entry points)


def training_flags(output_dir: Path, setting: Setting, learning_rate: float, seed: int) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--max_steps", str(setting.adapt_steps),
        "--per_device_train_batch_size", str(setting.batch_size), "--learning_rate", str(learning_rate),
        "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--weight_decay", "0", "--max_grad_norm", "1.0",
        "--seed", str(seed), "--data_seed", str(seed), "--max_length", "64", "--aux_loss_alpha", "0",
        "--bf16", "false", "--use_cpu", "true", "--dtype", "float32", "--dataloader_num_workers", "0",
        "--save_strategy", "no", "--logging_steps", str(max(1, setting.adapt_steps)), "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def train_one(method: str, base_dir: Path, data: Path, output_dir: Path, setting: Setting, learning_rate: float,
              seed: int, expert_config: Path | None) -> dict:
    """Train one method with the shipped entry point; returns what the run cost."""
    from deepseekmoe.finetune.esft.train import parse_esft_args, run_esft
    from deepseekmoe.finetune.sft import parse_sft_args, run_sft

    argv = ["--model_name_or_path", str(base_dir), "--dataset_name", str(data)]
    argv += training_flags(output_dir, setting, learning_rate, seed)
    torch.manual_seed(seed)  # LoRA's init happens before the Trainer seeds
    if expert_config is not None:
        result = run_esft(*parse_esft_args(argv + ["--expert_config", str(expert_config)]))
    elif method == "FFT":
        result = run_sft(*parse_sft_args(argv + ["--train_router", "true"]))
    elif method == "LoRA":
        result = run_sft(*parse_sft_args(argv + ["--use_peft", "true"]))
    else:
        raise ValueError(f"Unknown method {method!r}")
    trainer = result.trainer
    return {
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "stored_bytes": folder_bytes(output_dir),
        "training_state_bytes": training_state_bytes(trainer)["total"],
        "train_loss": result.train_output.training_loss,
        "train_seconds": result.train_output.metrics["train_runtime"],
    }


def load_trained(method: str, base_dir: Path, output_dir: Path, expert_config: Path | None):
    from deepseekmoe.finetune.adapters import load_model

    if method == "FFT":
        return load_model(output_dir).eval()
    return load_model(base_dir, adapter=output_dir).eval()


def check_only_selected_changed(base, trained, expert_config: dict) -> None:
    """An ESFT run may change its selected experts and nothing else."""
    trained_state = trained.state_dict()
    for name, before in base.state_dict().items():
        after = trained_state[name]
        if ".mlp.experts." in name:
            selected = set(expert_config["experts"].get(name.split(".")[2], []))
            changed = set((before != after).flatten(1).any(dim=1).nonzero().flatten().tolist())
            if changed - selected:
                raise AssertionError(f"ESFT changed unselected experts {sorted(changed - selected)} of {name}")
        elif not torch.equal(before, after):
            raise AssertionError(f"ESFT changed the frozen tensor {name}")


@dataclass
class Context:
    setting: Setting
    base: object
    base_dir: Path
    tokenizer: object
    heldout: list[dict]
    base_domain_losses: dict
    work_dir: Path
    log: object
    timings: dict = field(default_factory=dict)


def run_method(ctx: Context, task: str, table, data: Path, method: str, learning_rate: float, seed: int,
               expert_config: dict | None) -> dict:
    from deepseekmoe.finetune.synthetic import domain_losses

    name = f"{method.replace(' ', '_')}-lr{learning_rate:g}-seed{seed}"
    output_dir = ctx.work_dir / task / name
    config_path = None
    if expert_config is not None:
        config_path = ctx.work_dir / task / f"{name}.expert_config.json"
        config_path.write_text(json.dumps(expert_config))
    cost = train_one(method, ctx.base_dir, data, output_dir, ctx.setting, learning_rate, seed, config_path)
    model = load_trained(method, ctx.base_dir, output_dir, config_path)
    if expert_config is not None:
        check_only_selected_changed(ctx.base, model, expert_config)
    scores = target_scores(model, ctx.tokenizer, table)
    domains = domain_losses(model, ctx.tokenizer, ctx.heldout)
    forgetting = {d: domains[d] - ctx.base_domain_losses[d] for d in domains}
    ctx.timings.setdefault(task, {})[f"{method}|{learning_rate:g}|{seed}"] = cost.pop("train_seconds")
    run = {
        "method": method, "learning_rate": learning_rate, "seed": seed, **scores, **cost,
        "domain_losses": domains, "forgetting": forgetting,
        "mean_forgetting": sum(forgetting.values()) / len(forgetting),
        "experts_per_layer": ({layer: len(ids) for layer, ids in expert_config["experts"].items()}
                              if expert_config else None),
    }  # fmt: skip
    shutil.rmtree(output_dir, ignore_errors=True)
    ctx.log(f"  {task} {method:<18} lr={learning_rate:<6g} seed={seed}  EM {100 * scores['exact_match']:5.1f}%  "
            f"loss {scores['answer_loss']:.3f}  forgetting {run['mean_forgetting']:+.3f}")
    return run


def expert_configs(ctx: Context, data: Path, seed: int) -> tuple[dict, dict]:
    """ESFT-Token / ESFT-Gate / diagnostics expert configs for one training file, and the scores behind them."""
    from deepseekmoe.finetune.esft.scoring import score_experts, scoring_sequences
    from deepseekmoe.finetune.esft.selection import select_experts

    sequences = scoring_sequences(str(data), ctx.tokenizer, ctx.setting.probe_length, ctx.setting.probe_sequences)
    scores = score_experts(ctx.base, sequences, show_progress=False)
    configs = {method: select_experts(scores, kind, p) for method, (kind, p) in ESFT_SETTINGS.items()}
    rng, num_experts = random.Random(seed), ctx.base.config.n_routed_experts
    configs[RANDOM_EXPERTS] = {
        "experts": {layer: sorted(rng.sample(range(num_experts), len(ids)))
                    for layer, ids in configs["ESFT-Token"]["experts"].items()},
        "shared_experts": False, "non_expert_modules": False,
    }  # fmt: skip
    configs[ALL_EXPERTS] = {"experts": {layer: list(range(num_experts)) for layer in configs["ESFT-Token"]["experts"]},
                            "shared_experts": False, "non_expert_modules": False}
    return configs, {"token": scores.token, "gate": scores.gate, "num_tokens": scores.num_tokens}


def run_task(ctx: Context, task: str) -> dict:
    setting = ctx.setting
    log = ctx.log
    results = {"sweep": [], "final": [], "diagnostics": [], "selections": {}, "scores": {}, "tables": {}}
    chosen = {}
    for seed in setting.seeds:
        table = task_table(task, seed, setting.table_size)
        results["tables"][str(seed)] = len(table)
        data = write_training_file(ctx.work_dir / task / f"train-seed{seed}.jsonl", table,
                                   setting.adapt_steps * setting.batch_size, seed)
        if seed == setting.seeds[0]:
            results["base"] = target_scores(ctx.base, ctx.tokenizer, table)
            results["base_by_seed"] = {}
        results["base_by_seed"][str(seed)] = target_scores(ctx.base, ctx.tokenizer, table)
        configs, scores = expert_configs(ctx, data, seed)
        results["selections"][str(seed)] = {m: c["experts"] for m, c in configs.items() if m not in (ALL_EXPERTS,)}
        results["scores"][str(seed)] = scores
        for method in METHODS:
            grid = setting.lr_grid[method] if seed == setting.seeds[0] else (chosen[method],)
            runs = [run_method(ctx, task, table, data, method, lr, seed, configs.get(method)) for lr in grid]
            if seed == setting.seeds[0]:
                results["sweep"] += runs
                best = min(runs, key=lambda run: run["answer_loss"])
                chosen[method] = best["learning_rate"]
                results["final"].append(best)
            else:
                results["final"] += runs
        for method in DIAGNOSTICS:
            results["diagnostics"].append(
                run_method(ctx, task, table, data, method, chosen["ESFT-Token"], seed, configs[method]))
    results["chosen_learning_rates"] = chosen
    log(f"{task}: chosen LRs {chosen}")
    return results


# --------------------------------------------------------------------------------------------------------------------
# Main


def pretrain_base(setting: Setting, work_dir: Path, log) -> tuple:
    from deepseekmoe.finetune.synthetic import KNOWLEDGE_DOMAINS, make_mixed_corpus, pretrain, tiny_moe_config
    from transformers import AutoModelForCausalLM

    from modeling_deepseekmoe.tokenization import build_tokenizer

    base_dir = work_dir / "base"
    tokenizer = build_tokenizer(vocab_size=512, save_directory=base_dir)
    config = tiny_moe_config(len(tokenizer))
    per_domain = -(-setting.pretrain_steps * 32 // len(KNOWLEDGE_DOMAINS))
    corpus = make_mixed_corpus(per_domain, PRETRAIN_SEED, KNOWLEDGE_DOMAINS)
    log(f"pre-training {setting.pretrain_steps} steps on {', '.join(KNOWLEDGE_DOMAINS)}")
    started = time.perf_counter()
    model, curve = pretrain(tokenizer, corpus, config=config, steps=setting.pretrain_steps, batch_size=32,
                            seed=PRETRAIN_SEED, show_progress=False)
    seconds = time.perf_counter() - started
    model.save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base.requires_grad_(False)
    return base, base_dir, tokenizer, curve, seconds


def routing_specialisation(ctx: Context, tasks: tuple[str, ...]) -> dict:
    """Expert usage (ESFT-Token scores, all tokens) of every pre-training domain and of each target task's table."""
    by_domain = {}
    for domain in sorted(ctx.base_domain_losses):
        texts = [row["text"] for row in ctx.heldout if row["domain"] == domain]
        by_domain[domain] = routing_usage(ctx.base, ctx.tokenizer, texts)
    for task in tasks:
        table = task_table(task, ctx.setting.seeds[0], ctx.setting.table_size)
        by_domain[f"target:{task}"] = routing_usage(ctx.base, ctx.tokenizer, [p + a for p, a in table])
    halves = {}
    for domain in sorted(ctx.base_domain_losses):
        texts = [row["text"] for row in ctx.heldout if row["domain"] == domain]
        halves[domain] = [routing_usage(ctx.base, ctx.tokenizer, texts[::2]),
                          routing_usage(ctx.base, ctx.tokenizer, texts[1::2])]
    return {"usage": by_domain, "halves": halves}


def environment() -> dict:
    import peft
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__, "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}


def run(setting_name: str, output: Path, work_dir: Path | None = None, threads: int = 1, log=None) -> dict:
    """Pre-train, adapt with every method, evaluate; writes `output` (JSON) and returns its content."""
    import logging

    import datasets
    from transformers.utils import logging as hf_logging

    setting = SETTINGS[setting_name]
    started = time.perf_counter()
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), hf_logging.get_verbosity(),
             logging.getLogger("deepseekmoe").level)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    hf_logging.set_verbosity_error()
    logging.getLogger("deepseekmoe").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(setting_name, setting, output, work_dir, started, log)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        hf_logging.set_verbosity(saved[2])
        logging.getLogger("deepseekmoe").setLevel(saved[3])
        datasets.enable_progress_bars()


def _run(setting_name: str, setting: Setting, output: Path, work_dir: Path | None, started: float, log) -> dict:
    from deepseekmoe.finetune.synthetic import KNOWLEDGE_DOMAINS, domain_losses, make_mixed_corpus

    log = log or (lambda message: print(f"[{time.perf_counter() - started:6.0f}s] {message}", file=sys.stderr,
                                        flush=True))
    temporary = None
    if work_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="esft_vs_lora-")
        work_dir = Path(temporary.name)
    try:
        base, base_dir, tokenizer, curve, pretrain_seconds = pretrain_base(setting, work_dir, log)
        heldout = make_mixed_corpus(setting.heldout_per_domain, HELDOUT_SEED, KNOWLEDGE_DOMAINS)
        ctx = Context(setting, base, base_dir, tokenizer, heldout, domain_losses(base, tokenizer, heldout),
                      work_dir, log)
        ctx.timings["pretrain"] = pretrain_seconds
        log(f"base held-out losses {json.dumps({k: round(v, 3) for k, v in ctx.base_domain_losses.items()})}")
        tasks = {}
        for task in setting.tasks:
            tasks[task] = run_task(ctx, task)
        results = {
            "command": COMMAND + ("" if setting_name == "full" else f" --setting {setting_name}"),
            "setting_name": setting_name,
            "setting": asdict(setting),
            "model": {key: getattr(base.config, key) for key in (
                "num_hidden_layers", "hidden_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                "num_experts_per_tok", "first_k_dense_replace", "vocab_size")},
            "num_parameters": sum(p.numel() for p in base.parameters()),
            "domains": list(KNOWLEDGE_DOMAINS),
            "pretrain_loss_first": curve[0], "pretrain_loss_last": sum(curve[-20:]) / len(curve[-20:]),
            "base_domain_losses": ctx.base_domain_losses,
            "routing": routing_specialisation(ctx, setting.tasks),
            "tasks": tasks,
            "environment": environment(),
        }  # fmt: skip
    finally:
        if temporary is not None:
            temporary.cleanup()
    ctx.timings["wall"] = time.perf_counter() - started
    ctx.timings["process_cpu"] = time.process_time()  # this process's CPU seconds: less sensitive to a busy machine
    results["timings"] = ctx.timings
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    log(f"wrote {output} ({ctx.timings['wall'] / 60:.1f} min)")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="full")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/esft_vs_lora.json for the full setting, "
                             "a temporary file otherwise)")
    parser.add_argument("--report", type=Path, default=None,
                        help="markdown path (default: benchmarks/esft_vs_lora.md for the full setting)")
    parser.add_argument("--no_report", action="store_true", help="write the JSON only")
    parser.add_argument("--work_dir", type=Path, default=None, help="where runs are written (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: deterministic, shared machine)")
    args = parser.parse_args(argv)
    full = args.setting == "full"
    output = args.output or (RESULTS_PATH if full else Path(tempfile.gettempdir()) / "esft_vs_lora_smallest.json")
    results = run(args.setting, output, args.work_dir, args.threads)
    if not args.no_report:
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        from esft_report import render

        report = args.report or (HERE / "esft_vs_lora.md" if full else output.with_suffix(".md"))
        render(output, report)
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
