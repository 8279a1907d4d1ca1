"""ESFT vs LoRA vs full fine-tuning on a tiny DeepSeekMoE: the ESFT paper's comparison (arXiv 2407.01906, Tables 1-2)
at toy scale, on CPU, in 7-8 minutes (one thread of a shared 2-core machine).

    python benchmarks/esft_vs_lora.py                  # the default run behind benchmarks/esft_vs_lora.md

1. Pre-train a tiny DeepSeekMoE (`deepseekmoe.finetune.synthetic.tiny_moe_config`: 4 layers, 3 MoE layers of 16 routed + 1
   shared expert, top-2) from scratch on the synthetic mix (arithmetic / reversal / key_value / text) so routing
   specialises by domain. One base model (pre-training seed 0), as the paper has one backbone.
2. Target task, absent from pre-training: `reverse <word> -> <reversed word>` over the letters k-t (pre-training's
   reversal domain only uses a-j, so the task format is known but every answer token is new to it). Loss on the
   answer tokens (+ EOS) only, as the paper masks the prompt.
3. Adapt the base with FFT (every parameter), LoRA (r=8, alpha=16 on attention + routed experts + shared experts +
   dense MLP: everything but embeddings, LM head and routers), ESFT-Gate (p=0.1) and ESFT-Token (p=0.2) (experts
   scored on a sample of the target training data, per-layer normalisation; only the selected routed experts train).
   Every method sees the same batches for the same number of steps (plain AdamW loop, constant LR, clip 1.0, no
   weight decay, balance loss off for all). LRs: a 4-point sweep per method on seed 0, picked by the final loss on a
   validation split of the target data; the picked LR is then run on the other seeds. Diagnostics at ESFT-Token's
   LR: random experts (same count per layer) and all routed experts trainable.
4. Report target test loss / token accuracy / greedy exact match, held-out loss of every pre-training domain before
   and after (forgetting), trainable parameters, stored bytes, experts selected per layer, routing specialisation.

What a seed changes: the target training examples and their order, the ESFT probe sample, the LoRA init and the
random-expert draw. The base model and the validation / test / forgetting sets are the same for every seed. On one
CPU thread the run is deterministic (two runs gave identical numbers).
"""

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import peft
import torch
import transformers
from peft import get_peft_model

from moe_block import cpu_model  # noqa: E402  (a sibling script: benchmarks/ is on sys.path when run)
from deepseekmoe.finetune.esft.adapter import ADAPTER_WEIGHTS_FILE, save_esft_adapter
from deepseekmoe.finetune.esft.experts import prepare_esft_model, unwrap_esft_model
from deepseekmoe.finetune.esft.scoring import score_experts
from deepseekmoe.finetune.esft.selection import select_experts
from deepseekmoe.finetune.lora import build_lora_config, merge_lora
from deepseekmoe.finetune.synthetic import domain_losses, make_corpus, pretrain, tiny_moe_config
from modeling_deepseekmoe.tokenization import build_tokenizer


HERE = Path(__file__).resolve().parent
COMMAND = "python benchmarks/esft_vs_lora.py"
METHODS = ("FFT", "LoRA", "ESFT-Gate", "ESFT-Token")
LR_GRID = {
    "FFT": (3e-4, 1e-3, 3e-3, 1e-2),
    "LoRA": (1e-3, 3e-3, 1e-2, 3e-2),
    "ESFT-Gate": (1e-3, 3e-3, 1e-2, 3e-2),
    "ESFT-Token": (1e-3, 3e-3, 1e-2, 3e-2),
}
# Diagnostics (paper Table 4 style), at ESFT-Token's chosen LR: the same number of experts per layer picked at random,
# and every routed expert trainable (is it *which* experts, or *only routed experts*, that limits ESFT here?).
RANDOM_EXPERTS, ALL_EXPERTS = "Random experts (ESFT-Token counts)", "All routed experts"
DIAGNOSTICS = (RANDOM_EXPERTS, ALL_EXPERTS)
ESFT_SETTINGS = {"ESFT-Gate": ("gate", 0.1), "ESFT-Token": ("token", 0.2)}
TARGET_LETTERS = "klmnopqrst"  # pre-training's reversal domain uses "abcdefghij"
BATCH_SIZE = 32
NUM_VALID, NUM_TEST, NUM_PROBE, NUM_HELDOUT_PER_DOMAIN = 256, 500, 512, 250
VALID_SEED, TEST_SEED, HELDOUT_SEED, PRETRAIN_SEED = 10_001, 10_002, 10_003, 0


# --------------------------------------------------------------------------------------------------------------------
# Target task data


def target_example(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(TARGET_LETTERS) for _ in range(rng.randint(3, 6)))
    return f"reverse {word} ->", f" {word[::-1]}"


def target_rows(count: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """`count` (prompt, answer) pairs, deterministic for a seed, none of whose prompts is in `exclude`."""
    rng, rows = random.Random(seed), []
    while len(rows) < count:
        prompt, answer = target_example(rng)
        if prompt not in exclude:
            rows.append((prompt, answer))
    return rows


def tokenize_row(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): BOS + prompt (masked) + answer + EOS (trained)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def collate(tokenizer, rows: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    encoded = [tokenize_row(tokenizer, prompt, answer) for prompt, answer in rows]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(row_labels)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def answer_loss(model, tokenizer, rows: list[tuple[str, str]], batch_size: int = 128) -> tuple[float, float]:
    """(mean next-token loss, teacher-forced argmax accuracy) over the answer tokens (+ EOS)."""
    model.eval()
    total = correct = count = 0.0
    for start in range(0, len(rows), batch_size):
        batch = collate(tokenizer, rows[start : start + batch_size])
        output = model(**batch)
        targets = batch["labels"][:, 1:]
        scored = targets != -100
        tokens = scored.sum().item()
        total += output.loss.item() * tokens
        correct += ((output.logits[:, :-1].argmax(-1) == targets) & scored).sum().item()
        count += tokens
    return total / count, correct / count


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[tuple[str, str]], batch_size: int = 250) -> float:
    """Share of prompts whose greedy continuation (up to EOS) is exactly the answer."""
    model.eval()
    hits = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [tokenizer(prompt)["input_ids"] for prompt, _ in chunk]
        length = max(map(len, prompts))
        input_ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompts):  # left padding
            input_ids[i, length - len(ids) :] = torch.tensor(ids)
            attention_mask[i, length - len(ids) :] = 1
        generated = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        texts = tokenizer.batch_decode(generated[:, length:], skip_special_tokens=True)
        hits += sum(text.strip() == answer.strip() for text, (_, answer) in zip(texts, chunk))
    return hits / len(rows)


def routing_distributions(model, tokenizer, texts: list[str]) -> dict[int, list[float]]:
    """ESFT-Token scores (share of routed slots per expert, per layer) over unpacked texts, all tokens counted."""
    sequences = []
    for text in texts:
        ids = tokenizer(text + tokenizer.eos_token)["input_ids"]
        sequences.append({"input_ids": torch.tensor(ids), "score_mask": torch.ones(len(ids), dtype=torch.long)})
    return score_experts(model, sequences, show_progress=False).token


def total_variation(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def file_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------------------------------
# Adaptation


def build_method(method: str, base, seed: int, expert_config: dict | None):
    """A fresh trainable copy of `base` for `method` and its trainable parameters."""
    model = copy.deepcopy(base)
    if expert_config is not None:
        model = prepare_esft_model(model, expert_config)
    elif method == "FFT":
        model.requires_grad_(True)
    elif method == "LoRA":
        torch.manual_seed(seed)
        config = build_lora_config(["attention", "experts", "shared_experts", "dense_mlp"], r=8, lora_alpha=16)
        model = get_peft_model(model, config)
    else:
        raise ValueError(f"Unknown method {method!r}")
    return model, [p for p in model.parameters() if p.requires_grad]


def adapt(model, parameters, batches, learning_rate: float) -> tuple[list[float], float]:
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses, start = [], time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, time.perf_counter() - start


def stored_bytes(method: str, model, expert_config: dict | None) -> int:
    """FFT: the whole model's safetensors; LoRA: the PEFT adapter; ESFT: the selected experts (save_esft_adapter)."""
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        if expert_config is not None:
            save_esft_adapter(model, expert_config, directory, base_model_name_or_path="tiny-pretrained")
            return (directory / ADAPTER_WEIGHTS_FILE).stat().st_size
        model.save_pretrained(directory)
        return file_bytes(directory)


def check_esft_frozen(base, merged, expert_config: dict) -> int:
    """Only the selected experts may differ from the base; returns how many routed experts changed."""
    base_state, merged_state = base.state_dict(), merged.state_dict()
    changed_experts = 0
    for name, before in base_state.items():
        after = merged_state[name]
        if ".mlp.experts." in name:
            layer = name.split(".")[2]
            selected = set(expert_config["experts"].get(layer, []))
            differs = (before != after).flatten(1).any(dim=1).nonzero().flatten().tolist()
            if set(differs) - selected:
                raise AssertionError(f"ESFT changed unselected experts {sorted(set(differs) - selected)} in {name}")
            changed_experts += len(differs) if name.endswith("down_proj") else 0
        elif not torch.equal(before, after):
            raise AssertionError(f"ESFT changed the frozen tensor {name}")
    return changed_experts


def run_one(method, learning_rate, seed, base, tokenizer, data, expert_config, base_domain_losses, log) -> dict:
    model, parameters = build_method(method, base, seed, expert_config)
    trainable = sum(p.numel() for p in parameters)
    losses, train_seconds = adapt(model, parameters, data["batches"], learning_rate)
    storage = stored_bytes(method, model, expert_config)
    if method == "LoRA":
        model = merge_lora(model)
    elif expert_config is not None:
        model = unwrap_esft_model(model)
        check_esft_frozen(base, model, expert_config)
    model.eval()
    valid_loss, valid_token_accuracy = answer_loss(model, tokenizer, data["valid"])
    test_loss, test_token_accuracy = answer_loss(model, tokenizer, data["test"])
    test_accuracy = exact_match(model, tokenizer, data["test"])
    domains = domain_losses(model, tokenizer, data["heldout"])
    forgetting = {domain: domains[domain] - base_domain_losses[domain] for domain in domains}
    result = {
        "method": method, "learning_rate": learning_rate, "seed": seed,
        "trainable_parameters": trainable, "stored_bytes": storage,
        "train_seconds": train_seconds, "train_loss_first": losses[0], "train_loss_last": sum(losses[-10:]) / 10,
        "valid_loss": valid_loss, "valid_token_accuracy": valid_token_accuracy,
        "test_loss": test_loss, "test_token_accuracy": test_token_accuracy, "test_exact_match": test_accuracy,
        "domain_losses": domains, "forgetting": forgetting,
        "mean_forgetting": sum(forgetting.values()) / len(forgetting),
    }  # fmt: skip
    log(
        f"  {method:<10} lr={learning_rate:<7g} seed={seed}  valid {valid_loss:.3f}  test {test_loss:.3f}  "
        f"tok {100 * test_token_accuracy:4.1f}%  EM {100 * test_accuracy:5.1f}%  "
        f"forgetting {result['mean_forgetting']:+.3f}  ({train_seconds:.0f}s)"
    )
    return result


# --------------------------------------------------------------------------------------------------------------------
# Report


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    mean, spread = mean_spread([v * scale for v in values])
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return f"{text} ± {spread:.{digits}f}" if len(values) > 1 else text


def other_domains_forgetting(run: dict) -> float:
    """Mean held-out loss increase on the pre-training domains other than reversal (the target's source domain)."""
    values = [delta for domain, delta in run["forgetting"].items() if domain != "reversal"]
    return sum(values) / len(values)


def _mean(runs: list[dict], key) -> float:
    return statistics.fmean(key(run) if callable(key) else run[key] for run in runs)


def gain_share(base: dict, runs: list[dict], fft: list[dict], key: str, lower_is_better: bool = False) -> float:
    """Share of FFT's improvement over the base model that `runs` reach (1 = as good as FFT)."""
    sign = -1 if lower_is_better else 1
    fft_gain = sign * (_mean(fft, key) - base[key])
    return sign * (_mean(runs, key) - base[key]) / fft_gain if fft_gain > 0 else float("nan")


def dominating_runs(candidate: dict, sweep: list[dict], methods=("FFT", "LoRA")) -> list[dict]:
    """Sweep runs of `methods` that both forget no more and reach a lower target test loss than `candidate`."""
    return [
        run for run in sweep
        if run["method"] in methods and run["mean_forgetting"] <= candidate["mean_forgetting"]
        and run["test_loss"] < candidate["test_loss"]
    ]  # fmt: skip


def claim_statements(base: dict, by_method: dict[str, list[dict]], sweep: list[dict]) -> list[str]:
    """Plain comparisons, computed from the numbers."""
    fft, lora = by_method["FFT"], by_method["LoRA"]
    statements = []
    for method in ("LoRA", "ESFT-Gate", "ESFT-Token"):
        runs = by_method[method]
        statements.append(
            f"Target, {method} vs FFT: exact match {100 * _mean(runs, 'test_exact_match'):.1f}% vs "
            f"{100 * _mean(fft, 'test_exact_match'):.1f}%, token accuracy "
            f"{100 * _mean(runs, 'test_token_accuracy'):.1f}% vs {100 * _mean(fft, 'test_token_accuracy'):.1f}%, "
            f"loss {_mean(runs, 'test_loss'):.3f} vs "
            f"{_mean(fft, 'test_loss'):.3f}. Share of FFT's gain over the base: "
            f"{100 * gain_share(base, runs, fft, 'test_exact_match'):.0f}% (exact match), "
            f"{100 * gain_share(base, runs, fft, 'test_token_accuracy'):.0f}% (token accuracy), "
            f"{100 * gain_share(base, runs, fft, 'test_loss', lower_is_better=True):.0f}% (loss)."
        )
    statements.append(
        "For scale: in the paper (Table 1 average) ESFT-Token reaches 91%, ESFT-Gate 95% and LoRA 65% of FFT's score "
        f"gain over the vanilla model. The loss share above is inflated by the base model's very high target loss "
        f"({base['test_loss']:.2f}: it confidently predicts the pre-training letters), which any method removes first."
    )
    for method in ("ESFT-Gate", "ESFT-Token"):
        runs = by_method[method]
        for other_name, other in (("FFT", fft), ("LoRA", lora)):
            ours, theirs = [r["mean_forgetting"] for r in runs], [r["mean_forgetting"] for r in other]
            wins = sum(a < b for a, b in zip(ours, theirs))
            statements.append(
                f"Forgetting, {method} vs {other_name}: {statistics.fmean(ours):+.3f} vs "
                f"{statistics.fmean(theirs):+.3f} mean Δ loss (reversal excluded: "
                f"{_mean(runs, other_domains_forgetting):+.3f} vs {_mean(other, other_domains_forgetting):+.3f}); "
                f"{method} forgets less on {wins} of {len(ours)} seeds."
            )
    for method in ("ESFT-Gate", "ESFT-Token"):
        points = [run for run in sweep if run["method"] == method]
        described = []
        for point in points:
            better = dominating_runs(point, sweep)
            described.append(
                f"LR {point['learning_rate']:g} (loss {point['test_loss']:.2f}, "
                f"forgetting {point['mean_forgetting']:+.2f})"
                + (": dominated by " + ", ".join(f"{r['method']} {r['learning_rate']:g}" for r in better)
                   if better else ": not dominated")
            )  # fmt: skip
        statements.append(
            f"Trade-off on the seed-{points[0]['seed']} sweep, {method} (a point is dominated when an FFT or LoRA run "
            "forgets no more and reaches a lower target loss): " + "; ".join(described) + "."
        )
    fft_bytes = _mean(fft, "stored_bytes")
    for method in ("LoRA", "ESFT-Gate", "ESFT-Token"):
        statements.append(
            f"Storage, {method}: {_mean(by_method[method], 'stored_bytes'):,.0f} bytes = "
            f"{100 * _mean(by_method[method], 'stored_bytes') / fft_bytes:.1f}% of FFT's {fft_bytes:,.0f}."
        )
    return statements


def write_report(results: dict, path: Path) -> None:
    env, setup, base = results["environment"], results["setup"], results["base"]
    seeds = setup["seeds"]
    domains = sorted(base["domain_losses"])
    runs_of = {name: [run for run in results["final"] + results["diagnostics"] if run["method"] == name]
               for name in METHODS + DIAGNOSTICS}  # fmt: skip
    n_total, n_experts = base["num_parameters"], setup["model"]["n_routed_experts"]
    grid = "; ".join(f"{m} {', '.join(f'{lr:g}' for lr in lrs)}" for m, lrs in setup["lr_grid"].items())
    lines = [
        "# ESFT vs LoRA vs FFT on a tiny DeepSeekMoE (toy-scale replication of the ESFT paper's comparison)",
        "",
        f"Generated by `{setup['command']}` ({results['generated']}, {results['wall_seconds'] / 60:.1f} min on "
        f"CPU). Raw numbers: [`results/esft_vs_lora.json`](results/esft_vs_lora.json).",
        "",
        "**Claim tested** (ESFT paper, arXiv 2407.01906, Tables 1-2): training only the routed experts most used by "
        "the target task (ESFT) gets close to full fine-tuning (FFT) on that task, and forgets less of what the model "
        "could do before than FFT and LoRA, while storing far fewer bytes than FFT.",
        "",
        "**Verdict** (details and reasons under [Interpretation](#interpretation)): " + results["verdict"],
        "",
        "## Setup",
        "",
        f"- **Model**: `tiny_moe_config` — {setup['model']['num_hidden_layers']} layers (layer 0 dense), "
        f"{n_experts} routed + {setup['model']['n_shared_experts']} shared expert per MoE layer, "
        f"top-{setup['model']['num_experts_per_tok']}, hidden {setup['model']['hidden_size']}, expert width "
        f"{setup['model']['moe_intermediate_size']}, untied embeddings; {n_total:,} parameters, fp32.",
        f"- **Pre-training**: {setup['pretrain_steps']} steps × {BATCH_SIZE} samples of the synthetic mix "
        f"(arithmetic, reversal over letters a-j, key_value, text; `make_corpus`/`pretrain`), LR 3e-3 one-cycle, "
        f"balance loss α=0.01, seed {PRETRAIN_SEED}. Loss {base['pretrain_loss_first']:.2f} → "
        f"{base['pretrain_loss_last']:.2f} (mean of the last 20 steps). One base model for every run (the paper "
        "also has one backbone). Routing specialises by domain (table at the end).",
        f"- **Target task** (not in pre-training): `reverse <word> -> <reversed word>` with 3-6 letters from "
        f"`{TARGET_LETTERS}`. Pre-training's reversal only used `abcdefghij`, so the format is known but every answer "
        f"letter is new to the task (the letters do occur in the text domain). The base model scores "
        f"{100 * base['test_exact_match']:.1f}% exact match / {100 * base['test_token_accuracy']:.1f}% token accuracy "
        f"on it. Loss on answer tokens + EOS only (prompt masked, as in the paper's SFT). Splits: train "
        f"{setup['adapt_steps']} × {BATCH_SIZE} examples per seed, validation {NUM_VALID} (LR choice), test "
        f"{NUM_TEST} (reported); no validation/test word occurs in training.",
        f"- **Adaptation**: {setup['adapt_steps']} steps × {BATCH_SIZE} examples, the *same batches for every "
        f"method* ({setup['train_answer_tokens_seed0']:,} answer tokens on seed {seeds[0]}); plain AdamW loop, "
        "β=(0.9, 0.95), "
        "constant LR, no warm-up, no weight decay, grad clip 1.0, balance loss off for every method (the routers are "
        "frozen in ESFT and LoRA; FFT trains them with the LM loss only).",
        "- **Methods**: *FFT* = every parameter (embeddings, LM head, routers included). *LoRA* = r 8, α 16 on "
        "attention, routed experts (every expert, `ExpertsLoraLayer`), shared experts and the dense MLP "
        "(`build_lora_config`) — everything but embeddings, LM head, norms and routers, as in the paper. "
        "*ESFT-Gate* (p=0.1) / *ESFT-Token* (p=0.2) = `score_experts` on "
        f"{NUM_PROBE} unpacked training examples of the seed (answer tokens scored, per-layer normalisation), "
        "`select_experts`, `prepare_esft_model`: only the selected routed experts train; shared experts, attention, "
        "routers, norms, embeddings and LM head stay frozen. Every trained ESFT model is checked: only its selected "
        "experts differ from the base.",
        f"- **Diagnostics** (paper Table 4 style, at ESFT-Token's chosen LR): *{RANDOM_EXPERTS}* — as many experts "
        f"per layer as ESFT-Token selected, drawn at random; *{ALL_EXPERTS}* — all {n_experts} routed experts of "
        "every MoE layer trainable, everything else frozen.",
        f"- **LR**: per method a {len(next(iter(setup['lr_grid'].values())))}-point sweep on seed {seeds[0]} "
        f"({grid}), chosen by the final validation answer loss; the chosen LR is re-run on the other seeds (full "
        "sweep below). The grids are one point wider than planned because a first 3-point run picked the top LR for "
        "every method. The paper used FFT 3e-5, LoRA 1e-4, ESFT 1e-5 at 16B scale; a 0.5M-parameter model over 100 "
        "steps needs far larger values.",
        f"- **Seeds** {', '.join(map(str, seeds))}: a seed changes the training examples and their order, the ESFT "
        "probe sample, the LoRA init and the random-expert draw; ± is the sample standard deviation over seeds. The "
        "base model and the evaluation sets are fixed, so the spread leaves out pre-training variance.",
        "- **Forgetting**: held-out loss (all tokens) on fresh draws of each pre-training domain "
        f"({NUM_HELDOUT_PER_DOMAIN} per domain), after minus before. The text domain draws from a fixed 241-line "
        "file, so its 'held-out' loss measures retention of memorised lines.",
        "- **Stored bytes**: FFT = the whole model's safetensors (`save_pretrained`); LoRA = the PEFT adapter's "
        "`adapter_model.safetensors`; ESFT = the `adapter_model.safetensors` that `save_esft_adapter` writes "
        "(selected experts only). All fp32.",
        "",
        "## Results",
        "",
        f"Target test split ({NUM_TEST} examples): answer loss, teacher-forced token accuracy, greedy exact match. "
        "Forgetting: held-out loss increase on the pre-training domains (lower is better), as the mean over all 4, on "
        "reversal (a-j) alone — the domain the target was derived from — and as the mean over the 3 others. "
        f"Mean ± std over {len(seeds)} seed(s).",
        "",
        "| Method | LR | Target loss ↓ | Target token acc ↑ | Target exact match ↑ | Forgetting, mean Δ ↓ "
        "| Δ reversal (a-j) ↓ | Δ other 3 domains ↓ | Trainable params | Stored bytes | Experts / MoE layer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| Vanilla (base) | – | {base['test_loss']:.3f} | {100 * base['test_token_accuracy']:.1f}% "
        f"| {100 * base['test_exact_match']:.1f}% | 0 | 0 | 0 | 0 | – | – |",
    ]

    def row(name: str) -> str:
        runs = runs_of[name]
        trainable = statistics.fmean(run["trainable_parameters"] for run in runs)
        experts = "–"
        if "experts_per_layer" in runs[0]:
            counts = sorted({"/".join(str(n) for n in run["experts_per_layer"]) for run in runs})
            experts = " or ".join(counts) + f" of {n_experts}"
        return (
            f"| {name} | {runs[0]['learning_rate']:g} | {fmt([r['test_loss'] for r in runs])} "
            f"| {fmt([r['test_token_accuracy'] for r in runs], 1, 100)}% "
            f"| {fmt([r['test_exact_match'] for r in runs], 1, 100)}% "
            f"| {fmt([r['mean_forgetting'] for r in runs], sign=True)} "
            f"| {fmt([r['forgetting']['reversal'] for r in runs], sign=True)} "
            f"| {fmt([other_domains_forgetting(r) for r in runs], sign=True)} "
            f"| {trainable:,.0f} ({100 * trainable / n_total:.1f}%) "
            f"| {statistics.fmean(r['stored_bytes'] for r in runs):,.0f} | {experts} |"
        )

    lines += [row(name) for name in METHODS]
    lines.append("| *Diagnostics* | | | | | | | | | | |")
    lines += [row(name) for name in DIAGNOSTICS]
    lines += [
        "",
        "Experts / MoE layer: the counts in MoE layers 1/2/3 (every seed gave the listed pattern(s)). Trainable "
        "params and bytes are means over seeds (they vary only with the ESFT selection).",
        "",
        "### Held-out loss of each pre-training domain after adaptation",
        "",
        "| Method | " + " | ".join(domains) + " |",
        "|---|" + "---|" * len(domains),
        "| Vanilla (base) | " + " | ".join(f"{base['domain_losses'][d]:.3f}" for d in domains) + " |",
    ]
    for name in METHODS + DIAGNOSTICS:
        runs = runs_of[name]
        lines.append(f"| {name} | " + " | ".join(fmt([r["domain_losses"][d] for r in runs]) for d in domains) + " |")

    lines += ["", "### Against the claim", ""]
    lines += [f"- {line}" for line in results["summary"]["statements"]]
    lines += ["", "### Interpretation", "", results["interpretation"], ""]

    lines += [
        f"## LR sweep (seed {seeds[0]}; chosen = lowest validation loss)",
        "",
        "| Method | LR | Valid loss | Test loss | Test token acc | Test exact match | Forgetting, mean Δ "
        "| Δ reversal | Train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["sweep"]:
        chosen = " **(chosen)**" if run["learning_rate"] == results["chosen_lr"][run["method"]] else ""
        lines.append(
            f"| {run['method']} | {run['learning_rate']:g}{chosen} | {run['valid_loss']:.3f} | {run['test_loss']:.3f} "
            f"| {100 * run['test_token_accuracy']:.1f}% | {100 * run['test_exact_match']:.1f}% "
            f"| {run['mean_forgetting']:+.3f} | {run['forgetting']['reversal']:+.3f} | {run['train_seconds']:.1f} |"
        )
    lines += [
        "",
        "## Routing specialisation of the base model",
        "",
        "Total-variation distance between per-layer expert-usage distributions (ESFT-Token scores, all tokens, "
        "unpacked examples): 0 = identical routing, 1 = disjoint experts. The first row compares two disjoint halves "
        "of each domain's held-out draws (the sampling-noise floor).",
        "",
        "| MoE layer | " + " | ".join(base["routing"]["layers"]) + " |",
        "|---|" + "---|" * len(base["routing"]["layers"]),
    ]
    for row_name, values in base["routing"]["rows"].items():
        lines.append(f"| {row_name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += [
        "",
        f"ESFT selections on seed {seeds[0]}:",
        "",
    ]
    for name, cfg in results["selection_seed0"].items():
        if name == ALL_EXPERTS:
            continue
        lines.append(f"- {name}: " + ", ".join(f"layer {layer} → {ids}" for layer, ids in cfg["experts"].items()))
    lines += [
        f"- For comparison, the pre-training reversal domain's most used experts (top-"
        f"{setup['model']['num_experts_per_tok']} by token share): "
        + ", ".join(f"layer {layer} → {ids}" for layer, ids in base["routing"]["reversal_top"].items()) + ".",
        "",
        "## Environment and cost",
        "",
        f"- Command: `{setup['command']}`",
        f"- Device: {env['cpu']} (`model name` in /proc/cpuinfo), {env['cpu_count']} cores visible and shared with "
        f"another job; torch threads {env['threads']}; no GPU.",
        f"- Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}.",
        f"- Wall time: {results['wall_seconds'] / 60:.1f} min in all, of which pre-training "
        f"{base['pretrain_seconds']:.0f} s. Per-run training seconds are in the sweep table; on a shared 2-core CPU "
        "with a looped expert path they are noisy and say nothing about the methods' speed at scale.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain_steps", type=int, default=1000)
    parser.add_argument("--adapt_steps", type=int, default=100)
    parser.add_argument("--output_dir", default=str(HERE), help="writes esft_vs_lora.md and results/esft_vs_lora.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    tokenizer = build_tokenizer(vocab_size=512)
    config = tiny_moe_config(len(tokenizer))

    # 1. Pre-training: one base model; each pre-training sample is seen once.
    samples_per_domain = math.ceil(args.pretrain_steps * BATCH_SIZE / 4)
    corpus = make_corpus(samples_per_domain, seed=PRETRAIN_SEED)
    heldout = make_corpus(NUM_HELDOUT_PER_DOMAIN, seed=HELDOUT_SEED)
    log(f"pre-training {args.pretrain_steps} steps")
    t0 = time.perf_counter()
    base, pretrain_curve = pretrain(
        tokenizer, corpus, config=config, steps=args.pretrain_steps, batch_size=BATCH_SIZE, seed=PRETRAIN_SEED,
        show_progress=False,
    )  # fmt: skip
    pretrain_seconds = time.perf_counter() - t0
    base.config.aux_loss_alpha = 0.0  # adaptation: LM loss only, for every method
    base.requires_grad_(False)
    base_domain_losses = domain_losses(base, tokenizer, heldout)
    log(f"base held-out losses {json.dumps({k: round(v, 3) for k, v in base_domain_losses.items()})}")

    # Target splits shared by all seeds; training data per seed excludes their prompts.
    valid = target_rows(NUM_VALID, VALID_SEED)
    test = target_rows(NUM_TEST, TEST_SEED)
    excluded = {prompt for prompt, _ in valid + test}
    (base_test_loss, base_test_token_accuracy), base_test_em = (
        answer_loss(base, tokenizer, test), exact_match(base, tokenizer, test))
    base_valid_loss, _ = answer_loss(base, tokenizer, valid)
    arithmetic_rng = random.Random(HELDOUT_SEED + 1)
    sums = [(arithmetic_rng.randint(0, 99), arithmetic_rng.randint(0, 99)) for _ in range(NUM_HELDOUT_PER_DOMAIN)]
    base_arithmetic_em = exact_match(base, tokenizer, [(f"{x}+{y}=", str(x + y)) for x, y in sums])
    log(f"base target test loss {base_test_loss:.3f}, exact match {100 * base_test_em:.1f}%; "
        f"2-digit addition exact match {100 * base_arithmetic_em:.1f}%")

    # Routing specialisation of the base: TV distance between domains' expert usage, and to the target's.
    by_domain = {d: [row["text"] for row in heldout if row["domain"] == d] for d in sorted(base_domain_losses)}
    halves = {
        d: (routing_distributions(base, tokenizer, texts[::2]), routing_distributions(base, tokenizer, texts[1::2]))
        for d, texts in by_domain.items()
    }
    # Scores are means over sequences, so the whole domain's is the mean of its two equal halves'.
    usage = {d: {layer: [(a + b) / 2 for a, b in zip(first[layer], second[layer])] for layer in first}
             for d, (first, second) in halves.items()}  # fmt: skip
    target_usage = routing_distributions(base, tokenizer, [p + a for p, a in test[:NUM_HELDOUT_PER_DOMAIN]])
    layers = sorted(target_usage)
    names = sorted(usage)
    rows = {
        "same domain (noise floor, mean)": [
            statistics.fmean(total_variation(halves[d][0][layer], halves[d][1][layer]) for d in names)
            for layer in layers
        ],
        "between pre-training domains (mean of pairs)": [
            statistics.fmean(total_variation(usage[a][layer], usage[b][layer])
                             for i, a in enumerate(names) for b in names[i + 1:])
            for layer in layers
        ],  # fmt: skip
    }
    for d in names:
        rows[f"target vs {d}"] = [total_variation(target_usage[layer], usage[d][layer]) for layer in layers]
    top_k = config.num_experts_per_tok
    reversal_top = {
        str(layer): sorted(sorted(range(len(v)), key=lambda e: -v[e])[:top_k])
        for layer, v in usage["reversal"].items()
    }

    base_info = {
        "num_parameters": sum(p.numel() for p in base.parameters()),
        "pretrain_seconds": pretrain_seconds,
        "pretrain_loss_first": pretrain_curve[0],
        "pretrain_loss_last": statistics.fmean(pretrain_curve[-20:]),
        "pretrain_curve_every_50": pretrain_curve[::50],
        "domain_losses": base_domain_losses,
        "test_loss": base_test_loss, "test_token_accuracy": base_test_token_accuracy,
        "test_exact_match": base_test_em, "valid_loss": base_valid_loss, "arithmetic_exact_match": base_arithmetic_em,
        "routing": {"layers": [str(layer) for layer in layers], "rows": rows, "reversal_top": reversal_top},
    }  # fmt: skip

    def seed_data(seed: int) -> tuple[dict, dict[str, dict]]:
        train = target_rows(args.adapt_steps * BATCH_SIZE, seed, exclude=excluded)
        batches = [collate(tokenizer, train[i : i + BATCH_SIZE]) for i in range(0, len(train), BATCH_SIZE)]
        probe_rows = random.Random(seed + 1).sample(train, min(NUM_PROBE, len(train)))
        probe = []
        for prompt, answer in probe_rows:
            ids, labels = tokenize_row(tokenizer, prompt, answer)
            mask = torch.tensor([int(label != -100) for label in labels])
            probe.append({"input_ids": torch.tensor(ids), "score_mask": mask})
        scores = score_experts(base, probe, show_progress=False)
        selections = {name: select_experts(scores, kind, p=p) for name, (kind, p) in ESFT_SETTINGS.items()}
        rng = random.Random(seed + 2)
        selections[RANDOM_EXPERTS] = {
            **selections["ESFT-Token"],
            "experts": {layer: sorted(rng.sample(range(config.n_routed_experts), len(ids)))
                        for layer, ids in selections["ESFT-Token"]["experts"].items()},
        }  # fmt: skip
        selections[ALL_EXPERTS] = select_experts(scores, "token", top_k_per_layer=config.n_routed_experts)
        answer_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        data = {"batches": batches, "valid": valid, "test": test, "heldout": heldout, "answer_tokens": answer_tokens}
        return data, selections

    def run(method: str, lr: float, seed: int, data: dict, selections: dict) -> dict:
        expert_config = selections.get(method)
        result = run_one(method, lr, seed, base, tokenizer, data, expert_config, base_domain_losses, log)
        if expert_config is not None:
            result["expert_config"] = expert_config
            result["experts_per_layer"] = [len(ids) for ids in expert_config["experts"].values()]
        return result

    # 2. LR sweep on the first seed.
    first = args.seeds[0]
    data0, selections0 = seed_data(first)
    log(f"LR sweep on seed {first}; ESFT selections: "
        + "; ".join(f"{n}: {c['experts']}" for n, c in selections0.items()))  # fmt: skip
    sweep = [run(method, lr, first, data0, selections0) for method in METHODS for lr in LR_GRID[method]]
    chosen_lr = {
        method: min((r for r in sweep if r["method"] == method), key=lambda r: r["valid_loss"])["learning_rate"]
        for method in METHODS
    }
    log(f"chosen LRs {chosen_lr}")

    # 3. The chosen LR on the other seeds; the diagnostics at ESFT-Token's LR on every seed.
    final = [r for r in sweep if r["learning_rate"] == chosen_lr[r["method"]]]
    diagnostics = [run(name, chosen_lr["ESFT-Token"], first, data0, selections0) for name in DIAGNOSTICS]
    for seed in args.seeds[1:]:
        data, selections = seed_data(seed)
        final += [run(method, chosen_lr[method], seed, data, selections) for method in METHODS]
        diagnostics += [run(name, chosen_lr["ESFT-Token"], seed, data, selections) for name in DIAGNOSTICS]

    by_method = {method: [r for r in final + diagnostics if r["method"] == method] for method in METHODS + DIAGNOSTICS}
    results = {
        "generated": time.strftime("%Y-%m-%d %H:%M %Z"),
        "environment": {
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
        },  # fmt: skip
        "setup": {
            "command": COMMAND if argv is None and sys.argv[1:] == [] else f"{COMMAND} {' '.join(sys.argv[1:])}",
            "seeds": args.seeds, "pretrain_steps": args.pretrain_steps, "adapt_steps": args.adapt_steps,
            "batch_size": BATCH_SIZE, "lr_grid": LR_GRID, "esft": ESFT_SETTINGS, "target_letters": TARGET_LETTERS,
            "train_answer_tokens_seed0": data0["answer_tokens"],
            "model": {k: getattr(config, k) for k in (
                "num_hidden_layers", "hidden_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                "num_experts_per_tok", "first_k_dense_replace", "vocab_size")},
        },  # fmt: skip
        "base": base_info,
        "selection_seed0": selections0,
        "sweep": sweep,
        "chosen_lr": chosen_lr,
        "final": final,
        "diagnostics": diagnostics,
        "summary": {"statements": claim_statements(base_info, by_method, sweep)},
    }
    results["verdict"], results["interpretation"] = interpretation(base_info, by_method, sweep, args.adapt_steps)
    results["wall_seconds"] = time.perf_counter() - started
    output_dir = Path(args.output_dir)
    json_path = output_dir / "results" / "esft_vs_lora.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, output_dir / "esft_vs_lora.md")
    log(f"wrote {output_dir / 'esft_vs_lora.md'} and {json_path}")
    for statement in results["summary"]["statements"]:
        print(statement)
    return results


CLOSE_SHARE = 0.8  # "close to FFT": at least this share of FFT's exact-match gain (the paper's ESFT: 91-95%)


def interpretation(base: dict, by_method: dict[str, list[dict]], sweep: list[dict], steps: int) -> tuple[str, str]:
    """(one-paragraph verdict, interpretation), decided from the numbers by the rules written out in the text."""
    fft, lora = by_method["FFT"], by_method["LoRA"]
    esft = ("ESFT-Gate", "ESFT-Token")
    em = {name: _mean(runs, "test_exact_match") for name, runs in by_method.items()}
    share = {name: gain_share(base, runs, fft, "test_exact_match") for name, runs in by_method.items()}
    tok_share = {name: gain_share(base, runs, fft, "test_token_accuracy") for name, runs in by_method.items()}
    close = {m: share[m] >= CLOSE_SHARE for m in esft}
    less_forgetting = {
        m: all(a["mean_forgetting"] < b["mean_forgetting"] and a["mean_forgetting"] < c["mean_forgetting"]
               for a, b, c in zip(by_method[m], fft, lora))
        for m in esft
    }  # fmt: skip
    chosen_points = {
        m: next(r for r in sweep if r["method"] == m and r["learning_rate"] == by_method[m][0]["learning_rate"])
        for m in esft
    }
    dominated = {m: dominating_runs(chosen_points[m], sweep) for m in esft}
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    bytes_share = {m: _mean(by_method[m], "stored_bytes") / _mean(fft, "stored_bytes") for m in esft}

    target_text = (
        "held" if all(close.values()) else "did not hold" if not any(close.values()) else "held for one variant only"
    )
    forgetting_text = (
        "held" if all(less_forgetting.values()) else
        "did not hold" if not any(less_forgetting.values()) else "held for one variant only"
    )  # fmt: skip
    verdict = (
        f"**Target performance close to FFT: {target_text}.** ESFT-Gate / ESFT-Token reach "
        f"{pct(share['ESFT-Gate'])} / {pct(share['ESFT-Token'])} of FFT's exact-match gain over the base model "
        f"({100 * em['ESFT-Gate']:.1f}% / {100 * em['ESFT-Token']:.1f}% vs FFT {100 * em['FFT']:.1f}%; LoRA "
        f"{100 * em['LoRA']:.1f}% = {pct(share['LoRA'])}; token accuracy: {pct(tok_share['ESFT-Gate'])} / "
        f"{pct(tok_share['ESFT-Token'])}, LoRA {pct(tok_share['LoRA'])}); the bar used here is {pct(CLOSE_SHARE)}. "
        f"**Less forgetting than FFT and LoRA: {forgetting_text}** (on every seed, for "
        f"{' and '.join(m for m in esft if less_forgetting[m]) or 'neither variant'})"
    )
    if any(dominated.values()):
        verdict += (
            ", but the seed-0 LR sweep shows it is bought by learning less: "
            + "; ".join(
                f"{m}'s chosen run both forgets more and fits the target worse than "
                + ", ".join(f"{r['method']} at LR {r['learning_rate']:g}" for r in dominated[m])
                for m in esft if dominated[m]
            )
        )
    storage_text = "held" if all(share_ < 0.5 for share_ in bytes_share.values()) else "did not hold"
    verdict += (
        f". **Storage far below FFT: {storage_text}** ({pct(bytes_share['ESFT-Gate'])} / "
        f"{pct(bytes_share['ESFT-Token'])} of FFT's bytes; LoRA "
        f"{pct(_mean(lora, 'stored_bytes') / _mean(fft, 'stored_bytes'))}). One toy model, one target task: this "
        "is a sanity check of the mechanism, not evidence about the paper's 16B-scale numbers."
    )

    all_runs, random_runs, token_runs = by_method[ALL_EXPERTS], by_method[RANDOM_EXPERTS], by_method["ESFT-Token"]
    selected_wins = sum(a["test_loss"] < b["test_loss"] for a, b in zip(token_runs, random_runs))
    counts = [n for m in esft for run in by_method[m] for n in run["experts_per_layer"]]
    count_text = f"{min(counts)}-{max(counts)}" if min(counts) != max(counts) else str(min(counts))
    num_experts = len(next(iter(all_runs[0]["expert_config"]["experts"].values())))
    all_params = _mean(all_runs, "trainable_parameters") / base["num_parameters"]
    ordering = em["FFT"] > em["LoRA"] > max(em[m] for m in esft)
    paragraphs = []
    all_share = share[ALL_EXPERTS]
    if all_share < 0.5:
        reason = (
            f"Training *every* routed expert ({pct(all_params)} of the parameters) still reaches only "
            f"{pct(all_share)} of FFT's exact-match gain ({100 * em[ALL_EXPERTS]:.1f}%; "
            f"{pct(tok_share[ALL_EXPERTS])} of its token-accuracy gain; run at ESFT-Token's LR, not tuned "
            "separately), so neither the choice nor the number of experts is "
            "the main limit: the routed experts alone, with "
            "attention, shared experts, norms, embeddings and LM head frozen, do not learn this adaptation in "
            f"{steps} steps. The likely reason is the task (a hypothesis, not tested here): it re-uses the "
            "pre-trained reversal mechanism (attention that copies letters back to front) on letters that mechanism "
            "never copied, "
            f"and the base model confidently predicts the old letters (target loss {base['test_loss']:.2f}), so the "
            "fix probably needs the attention / embedding / unembedding path"
            + (" — consistent with LoRA, which adapts attention, getting further than ESFT, and FFT, which also "
               "adapts embeddings and the LM head, furthest" if ordering else "")
            + ". The paper's tasks (math, code, intent, law, translation on a "
            "16B model) mostly call for knowledge and formats that live in the FFN experts, where ESFT has room; "
            "this toy target does not."
        )
    else:
        reason = (
            f"Training every routed expert reaches {pct(all_share)} of FFT's exact-match gain "
            f"({100 * em[ALL_EXPERTS]:.1f}%), so the routed experts can express the adaptation when enough of them "
            f"train; ESFT's few selected experts ({count_text} of {num_experts} per layer) are likely too little "
            "capacity for it at this scale and step count."
        )
    paragraphs.append(
        "*Target.* ESFT learns part of the target — token accuracy "
        f"{100 * _mean(token_runs, 'test_token_accuracy'):.1f}% (Token) / "
        f"{100 * _mean(by_method['ESFT-Gate'], 'test_token_accuracy'):.1f}% (Gate) vs base "
        f"{100 * base['test_token_accuracy']:.1f}% — but rarely gets a whole word right. " + reason
    )
    closest = {
        layer: min((name for name in base["routing"]["rows"] if name.startswith("target vs")),
                   key=lambda name: base["routing"]["rows"][name][i])
        for i, layer in enumerate(base["routing"]["layers"])
    }  # fmt: skip
    reversal_closest = all(name == "target vs reversal" for name in closest.values())
    selection_helps = selected_wins > len(token_runs) / 2
    reversal_delta = _mean(token_runs, lambda r: r["forgetting"]["reversal"])
    others_delta = _mean(token_runs, other_domains_forgetting)
    concentrated = reversal_delta > 2 * others_delta
    paragraphs.append(
        f"*Which experts.* The ESFT-Token selection beats the same number of random experts on target loss on "
        f"{selected_wins} of {len(token_runs)} seeds ({_mean(token_runs, 'test_loss'):.3f} vs "
        f"{_mean(random_runs, 'test_loss'):.3f})"
        + (", and in every MoE layer the target's routing is closest to the pre-training reversal domain's (routing "
           "table below)" if reversal_closest else "")
        + (", so the scores do find the task's experts." if selection_helps else
           ", so here the scores did not find better experts than chance.")
        + " Forgetting, by domain: ESFT-Token changes reversal (a-j) by "
        f"Δ {reversal_delta:+.2f} and the other three domains by Δ {others_delta:+.2f} on average (random experts "
        f"of the same count: {_mean(random_runs, other_domains_forgetting):+.2f}), whereas FFT and LoRA move the "
        f"other three by {_mean(fft, other_domains_forgetting):+.2f} and {_mean(lora, other_domains_forgetting):+.2f}."
        + (" So ESFT's damage is concentrated on the domain whose experts it trained, as the paper's mechanism "
           "predicts (changes stay inside the experts the task uses); here the target conflicts with exactly that "
           "domain (same prompt, different answer letters), so that domain pays." if concentrated else "")
    )
    counts_text = f"{count_text} of {num_experts}"
    paragraphs.append(
        "*Caveats.* LRs were picked on target validation loss alone, which favours aggressive LRs; FFT's and LoRA's "
        "forgetting at their chosen LRs is large (the sweep table shows gentler points). The base model is one "
        f"pre-training run of a {base['num_parameters'] / 1e6:.1f}M-parameter model; ESFT selects {counts_text} "
        f"routed experts per layer, so its trainable set is tiny in absolute terms. At hidden size 64, rank-8 LoRA "
        f"on every module is {pct(_mean(lora, 'trainable_parameters') / base['num_parameters'])} of the model "
        "(at 16B scale it would be well under 1%), so LoRA is relatively far larger here than in the paper"
        + (", and its adapter outweighs ESFT's (in the paper LoRA stores the least). "
           if _mean(lora, "stored_bytes") > max(_mean(by_method[m], "stored_bytes") for m in esft) else ". ")
        + f"{steps} adaptation steps, one "
        "target task, chosen (before any ESFT run) because FFT can learn it within the budget and exact match is "
        "measurable; 3-digit addition was rejected because this model cannot even add 2-digit numbers (base exact "
        f"match on pre-training-style 2-digit sums: {100 * base['arithmetic_exact_match']:.1f}%)."
    )
    return verdict, "\n\n".join(paragraphs)


if __name__ == "__main__":
    main()
