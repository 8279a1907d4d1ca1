"""The built-in demo: the whole workflow on a tiny DeepSeekMoE, on CPU, in a few minutes.

1. pre-train a tiny DeepSeekMoE on a synthetic multi-domain corpus (arithmetic, string reversal, key-value recall,
   plain text) so that routing specialises; save it in the released layout and load it back through
   `AutoModelForCausalLM`;
2. SFT it into a chat model (DeepSeek chat template, loss on the answers) on reversal and key-value conversations;
3. ESFT on a new operator, the digit multiplication table (`3x4=12`, knowledge the experts can store): score the
   experts, select them, train only those, merge;
4. evaluate base / SFT / ESFT with the lm-eval wrapper on the shipped demo tasks, and analyse the routing;
5. print the results table and the paths of the plots and model cards. Same seed, same numbers.
"""

import json
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepseekmoe.finetune.synthetic import make_corpus, pair_conversations, pretrain, product_table, task_conversations
from deepseekmoe.model_cards.card import write_base_card
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_deepseekmoe.checkpoint import validate_checkpoint
from modeling_deepseekmoe.tokenization import build_tokenizer

SFT_DOMAINS = ("reversal", "key_value")
ESFT_DOMAIN = "multiplication"
ESFT_PAIRS = product_table(1, 5)  # 25 pairs "3x4=" -> "12": a new operator, absent from pre-training and SFT
ESFT_EXAMPLE = "3x4="
# ESFT-Token at p = 0.5, where the paper's Token scores peak (§6.2): with top-2 of 16 experts, the default p = 0.2
# keeps one expert per layer, too little to store a new table (benchmarks/esft_vs_lora.md).
ESFT_TOKEN_P = 0.5
ESFT_LEARNING_RATE = 3e-2  # only a few experts train, over a short run
CHAT_DOMAINS = ("arithmetic", "reversal", "key_value")


@dataclass
class DemoSettings:
    pretrain_steps: int = 400
    corpus_per_domain: int = 600
    sft_steps: int = 60
    esft_steps: int = 200
    train_rows_per_domain: int = 400
    eval_limit: int | None = 40
    analysis_ablations: bool = True


FAST_SETTINGS = DemoSettings(pretrain_steps=120, corpus_per_domain=200, sft_steps=15, esft_steps=20,
                             train_rows_per_domain=64, eval_limit=8, analysis_ablations=False)


@dataclass
class DemoResult:
    output_dir: Path
    base_dir: Path
    sft_dir: Path
    esft_adapter_dir: Path
    esft_merged_dir: Path
    expert_config: dict
    chat_losses: dict[str, dict[str, float]]  # model -> domain -> answer loss
    exact_match: dict[str, dict[str, float]]  # model -> task -> exact match
    prompt: str = ""
    completion: str = ""  # the ESFT model's answer to `prompt`
    completion_before: str = ""  # the SFT model's (before ESFT)
    esft_task_exact_match: dict[str, float] = field(default_factory=dict)  # model -> share of ESFT_PAIRS right
    routing: list[dict] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    model_cards: list[Path] = field(default_factory=list)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def _training_flags(output_dir: Path, steps: int, learning_rate: float, seed: int) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--max_steps", str(steps), "--learning_rate", str(learning_rate),
        "--per_device_train_batch_size", "16", "--lr_scheduler_type", "constant", "--logging_steps", "5",
        "--save_strategy", "no", "--report_to", "none", "--seed", str(seed), "--max_length", "64",
        "--bf16", "false", "--use_cpu", "true", "--dtype", "float32", "--dataloader_num_workers", "0",
        "--disable_tqdm", "true",
    ]  # fmt: skip


@torch.no_grad()
def answer_losses(model, tokenizer, rows_by_domain: dict[str, list[dict]]) -> dict[str, float]:
    """Mean loss on the assistant answers (and EOS) of chat rows, per domain."""
    from datasets import Dataset
    from deepseekmoe.finetune.data import prepare_sft_dataset

    model.eval()
    losses = {}
    for domain, rows in rows_by_domain.items():
        tokenized = prepare_sft_dataset(Dataset.from_list(rows), tokenizer, max_length=None)
        total = count = 0.0
        for row in tokenized:
            labels = torch.tensor([row["labels"]])
            tokens = int((labels[:, 1:] != -100).sum())
            total += model(torch.tensor([row["input_ids"]]), labels=labels).loss.item() * tokens
            count += tokens
        losses[domain] = total / count
    return losses


def _chat_prompt(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


@torch.no_grad()
def chat_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 4) -> list[str]:
    """Greedy one-turn answers (stripped) of a chat model."""
    model.eval()
    answers = []
    for prompt in prompts:
        input_ids = _chat_prompt(tokenizer, prompt)
        generated = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(tokenizer.decode(generated[0, input_ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


@contextmanager
def _one_thread():
    """The demo's models are tiny: one intra-op thread is as fast, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_demo(output_dir: str | Path = "deepseekmoe-demo", seed: int = 0, fast: bool = False,
             settings: DemoSettings | None = None) -> DemoResult:
    with _one_thread():
        return _run_demo(Path(output_dir), seed, settings or (FAST_SETTINGS if fast else DemoSettings()))


def _run_demo(output_dir: Path, seed: int, settings: DemoSettings) -> DemoResult:
    from deepseekmoe.eval.analysis import analyze, load_samples, token_routing
    from deepseekmoe.eval.harness import evaluate
    from deepseekmoe.finetune.adapters import load_model
    from deepseekmoe.finetune.esft.merge import merge_esft_adapter
    from deepseekmoe.finetune.esft.scoring import score_experts, scoring_sequences
    from deepseekmoe.finetune.esft.selection import plot_selection, select_experts
    from deepseekmoe.finetune.esft.train import parse_esft_args, run_esft
    from deepseekmoe.finetune.sft import parse_sft_args, run_sft

    output_dir.mkdir(parents=True, exist_ok=True)
    data_dir = output_dir / "data"
    data_dir.mkdir(exist_ok=True)
    logging.getLogger("deepseekmoe").setLevel(logging.ERROR)

    # 1. Pre-train, save in the released layout, load back natively.
    base_dir = output_dir / "base"
    tokenizer = build_tokenizer(vocab_size=512, save_directory=base_dir)
    corpus = make_corpus(settings.corpus_per_domain, seed=seed)
    model, _ = pretrain(tokenizer, corpus, steps=settings.pretrain_steps, seed=seed)
    model.save_pretrained(base_dir, max_shard_size="1MB")
    validate_checkpoint(base_dir, model.config)
    cards = [write_base_card(base_dir, model.config, model_name="tiny-deepseekmoe-base", origin=(
        f"Pre-trained by `deepseekmoe demo` for {settings.pretrain_steps} steps on a synthetic multi-domain corpus "
        "(arithmetic, string reversal, key-value recall, plain text)."))]
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    # 2. SFT into a chat model (full fine-tuning: the tiny model is the base of the ESFT step).
    held_out = {d: task_conversations(d, 48, seed=seed + 100) for d in CHAT_DOMAINS}
    held_out[ESFT_DOMAIN] = pair_conversations(ESFT_PAIRS)  # the knowledge is the table itself
    sft_rows = [row for d in SFT_DOMAINS for row in task_conversations(d, settings.train_rows_per_domain, seed)]
    sft_data = _write_jsonl(data_dir / "sft.jsonl", sft_rows)
    sft_dir = output_dir / "sft"
    sft_argv = ["--model_name_or_path", str(base_dir), "--dataset_name", str(sft_data), "--aux_loss_alpha", "0.01"]
    run_sft(*parse_sft_args(sft_argv + _training_flags(sft_dir, settings.sft_steps, 2e-3, seed)))
    cards.append(sft_dir / "README.md")
    sft = AutoModelForCausalLM.from_pretrained(sft_dir).eval()

    # 3. ESFT on the new operator: score, select, train only the selected experts, merge.
    rng = random.Random(seed + 1)
    esft_rows = pair_conversations([rng.choice(ESFT_PAIRS) for _ in range(settings.train_rows_per_domain)])
    esft_data = _write_jsonl(data_dir / f"esft_{ESFT_DOMAIN}.jsonl", esft_rows)
    scores = score_experts(sft, scoring_sequences(str(esft_data), tokenizer, 256, 16), show_progress=False)
    scores.save(output_dir / "esft" / "scores.json")
    expert_config = select_experts(scores, "token", p=ESFT_TOKEN_P)
    (output_dir / "esft" / "expert_config.json").write_text(json.dumps(expert_config, indent=2) + "\n")
    plots = [plot_selection(scores, expert_config, output_dir / "esft" / "selection.png")]
    adapter_dir = output_dir / "esft" / "adapter"
    esft_argv = ["--model_name_or_path", str(sft_dir), "--dataset_name", str(esft_data),
                 "--expert_config", str(output_dir / "esft" / "expert_config.json")]
    esft_argv += _training_flags(adapter_dir, settings.esft_steps, ESFT_LEARNING_RATE, seed)
    run_esft(*parse_esft_args(esft_argv))
    cards.append(adapter_dir / "README.md")
    merged_dir = merge_esft_adapter(sft_dir, adapter_dir, output_dir / "esft" / "merged", overwrite=True)
    esft = load_model(sft_dir, adapter=adapter_dir).eval()

    # 4. Evaluate base / SFT / ESFT (answer losses directly, exact match through lm-eval), analyse the routing.
    chat_losses = {name: answer_losses(m, tokenizer, held_out) for name, m in
                   (("base", base), ("sft", sft), ("esft", esft))}
    exact_match = {}
    for name, kwargs in (("base", {"pretrained": str(base_dir)}), ("sft", {"pretrained": str(sft_dir)}),
                         ("esft", {"pretrained": str(sft_dir), "adapter": str(adapter_dir)})):
        evaluation = evaluate(tasks=["dsmoe_demo"], limit=settings.eval_limit, device="cpu", model_card=True,
                              output_path=output_dir / "eval" / name, **kwargs)
        exact_match[name] = {task.removeprefix("dsmoe_demo_"): values["exact_match,strip"]
                             for task, values in evaluation.results["results"].items() if task != "dsmoe_demo"}
    cards.append(merged_dir / "README.md")
    samples = load_samples([_write_jsonl(data_dir / "analysis.jsonl", make_corpus(24, seed=seed + 200))])
    analysis = analyze(base, tokenizer, samples, output_dir / "analysis", model_name="tiny-deepseekmoe-base",
                       ablations=settings.analysis_ablations, progress=False, seed=seed)
    plots += [output_dir / "analysis" / name for name in analysis["files"] if str(name).endswith(".png")]

    # 5. The ESFT task's table before and after ESFT; one chat turn of the ESFT model and the experts it used.
    prompts = [prompt for prompt, _ in ESFT_PAIRS]
    answers = {name: chat_answers(m, tokenizer, prompts) for name, m in (("sft", sft), ("esft", esft))}
    table_exact_match = {name: sum(a == b.strip() for a, (_, b) in zip(got, ESFT_PAIRS)) / len(ESFT_PAIRS)
                         for name, got in answers.items()}
    prompt = ESFT_EXAMPLE
    completion_before = chat_answers(sft, tokenizer, [prompt])[0]
    input_ids = _chat_prompt(tokenizer, prompt)
    generated = esft.generate(input_ids, max_new_tokens=6, do_sample=False)
    completion = tokenizer.decode(generated[0, input_ids.shape[1]:], skip_special_tokens=True)
    routing = token_routing(esft, tokenizer, tokenizer.decode(generated[0], skip_special_tokens=False))
    per_token = [{"token": token, "experts": {layer: routing.experts[layer][i].tolist() for layer in routing.experts}}
                 for i, token in enumerate(routing.tokens)]
    return DemoResult(output_dir, base_dir, sft_dir, adapter_dir, merged_dir, expert_config, chat_losses,
                      exact_match, prompt, completion, completion_before, table_exact_match, per_token, plots,
                      cards)


def format_demo(result: DemoResult) -> str:
    domains = list(next(iter(result.chat_losses.values())))
    lines = [
        "DeepSeekMoE demo",
        f"  base (pre-trained, released layout): {result.base_dir}",
        f"  SFT chat model:                      {result.sft_dir}",
        f"  ESFT adapter ({ESFT_DOMAIN}):          {result.esft_adapter_dir}",
        f"  ESFT merged checkpoint:              {result.esft_merged_dir}",
        "",
        "ESFT selection (layer: experts): " + "  ".join(
            f"{layer}: {ids}" for layer, ids in result.expert_config["experts"].items()),
        "",
        "Answer loss on held-out chat tasks (lower is better):",
        "| model | " + " | ".join(domains) + " |",
        "|---|" + "---|" * len(domains),
    ]
    for name, losses in result.chat_losses.items():
        lines.append(f"| {name} | " + " | ".join(f"{losses[d]:.3f}" for d in domains) + " |")
    sft, esft = result.chat_losses["sft"], result.chat_losses["esft"]
    others = [d for d in domains if d != ESFT_DOMAIN]
    lines += [
        "",
        f"ESFT on {ESFT_DOMAIN}: target loss {sft[ESFT_DOMAIN]:.3f} -> {esft[ESFT_DOMAIN]:.3f}; other domains move "
        + ", ".join(f"{d} {esft[d] - sft[d]:+.3f}" for d in others),
        "",
        "Exact match through lm-eval (dsmoe_demo tasks):",
        "| model | " + " | ".join(next(iter(result.exact_match.values()))) + " |",
        "|---|" + "---|" * len(next(iter(result.exact_match.values()))),
    ]
    for name, scores in result.exact_match.items():
        lines.append(f"| {name} | " + " | ".join(f"{value:.2f}" for value in scores.values()) + " |")
    lines += [
        "",
        f"ESFT task, the {ESFT_DOMAIN} table ({len(ESFT_PAIRS)} pairs such as {ESFT_PAIRS[0][0]!r} -> "
        f"{ESFT_PAIRS[0][1]!r}), greedy answers right: "
        + ", ".join(f"{name} {100 * value:.0f}%" for name, value in result.esft_task_exact_match.items()),
        f"User: {result.prompt!r} -> SFT model (before ESFT): {result.completion_before!r}, "
        f"ESFT model: {result.completion.strip()!r}",
    ]
    lines += ["", f"ESFT model, User: {result.prompt!r} -> Assistant: {result.completion!r}",
              "Routed experts of each token (layer: experts):"]
    for entry in result.routing[-12:]:
        experts = "  ".join(f"L{layer}:{','.join(map(str, ids))}" for layer, ids in entry["experts"].items())
        lines.append(f"  {entry['token']!r:>12}  {experts}")
    lines += ["", "Plots:"] + [f"  {path}" for path in result.plots]
    lines += ["Model cards:"] + [f"  {path}" for path in result.model_cards]
    return "\n".join(lines)
