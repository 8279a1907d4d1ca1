"""Render benchmarks/esft_vs_lora.md and its plot from the JSON that benchmarks/esft_vs_lora.py writes.

    python benchmarks/esft_report.py [results/esft_vs_lora.json] [esft_vs_lora.md]
"""

import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("FFT", "LoRA", "ESFT-Token", "ESFT-Gate")
DIAGNOSTICS = ("Random experts", "All routed experts")
ESFT = ("ESFT-Token", "ESFT-Gate")
# The paper's numbers these are compared with (Table 1 average share of FFT's gain over the vanilla model).
PAPER_SHARE = {"LoRA": 0.65, "ESFT-Token": 0.91, "ESFT-Gate": 0.95}
# Fixed with the protocol: a share of FFT's gain counts as "held" at >= 0.8, "partly" at >= 0.5.
HELD, PARTLY = 0.8, 0.5
# The one run before the final protocol (its log, not in the JSON): same code, 150 steps, 3-point grids.
PILOT = (
    "a first run of the same code with 150 steps and 3-point LR grids (FFT 1e-3/3e-3/1e-2, LoRA and ESFT "
    "3e-3/1e-2/3e-2) was stopped after new_facts seed 0 (and two seed-1 runs) because it would have taken ~35 min "
    "on one core. Its new_facts seed-0 exact match: FFT 100/94/78%, LoRA 100/82/3%, ESFT-Token 31/32/29%, "
    "ESFT-Gate 36/41/35% (per LR), random experts 13%, all routed experts 99%. The final protocol cuts the steps to "
    "100 for every method and drops each grid's top LR (never the chosen one in the pilot); nothing else changed."
)
TASK_TITLES = {
    "new_facts": "new facts (`the code of <unseen name> is <NN>`, 100 per seed)",
    "new_operator": "new operator (`7x3=21`: the digit multiplication table, 100 pairs)",
}


def mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def spread(values) -> float:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values, digits=3, scale=1.0, sign=False, suffix="") -> str:
    values = [v * scale for v in values]
    text = f"{mean(values):+.{digits}f}" if sign else f"{mean(values):.{digits}f}"
    return f"{text}{suffix} ± {spread(values):.{digits}f}" if len(values) > 1 else f"{text}{suffix}"


def runs_of(task: dict, method: str) -> list[dict]:
    return sorted((run for run in task["final"] + task["diagnostics"] if run["method"] == method),
                  key=lambda run: run["seed"])


def gains(task: dict, runs: list[dict]) -> list[float]:
    """Exact-match gain over the base model on the same seed's table."""
    return [run["exact_match"] - task["base_by_seed"][str(run["seed"])]["exact_match"] for run in runs]


def share_of_fft(task: dict, method: str) -> float:
    fft_gain = mean(gains(task, runs_of(task, "FFT")))
    return mean(gains(task, runs_of(task, method))) / fft_gain if fft_gain > 0 else float("nan")


def verdict(share: float) -> str:
    if math.isnan(share):
        return "not measurable (FFT did not improve)"
    return "held" if share >= HELD else "partly held" if share >= PARTLY else "did not hold"


def total_variation(p, q) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def top_share(values, k: int) -> float:
    return sum(sorted(values, reverse=True)[:k])


def experts_pattern(runs: list[dict]) -> str:
    patterns = sorted({"/".join(str(n) for n in run["experts_per_layer"].values()) for run in runs
                       if run.get("experts_per_layer")})
    return " or ".join(patterns) if patterns else "–"


# --------------------------------------------------------------------------------------------------------------------


def claims(name: str, task: dict, results: dict) -> list[str]:
    lines = []
    fft = runs_of(task, "FFT")
    for method in ("ESFT-Token", "ESFT-Gate", "LoRA"):
        share = share_of_fft(task, method)
        lines.append(
            f"**{method} reaches {100 * share:.0f}% of FFT's exact-match gain** (paper: {100 * PAPER_SHARE[method]:.0f}%)"
            + (f": {verdict(share)}." if method != "LoRA" else ".")
        )
    for method in ESFT:
        ours = runs_of(task, method)
        for other_name in ("FFT", "LoRA"):
            other = runs_of(task, other_name)
            wins = sum(a["mean_forgetting"] < b["mean_forgetting"] for a, b in zip(ours, other))
            lines.append(
                f"Forgetting, {method} vs {other_name}: {mean(r['mean_forgetting'] for r in ours):+.3f} vs "
                f"{mean(r['mean_forgetting'] for r in other):+.3f} mean Δ held-out loss; {method} forgets less on "
                f"{wins} of {len(ours)} seeds: " + ("held." if wins == len(ours) else "did not hold on every seed.")
            )
    fft_bytes = mean(r["stored_bytes"] for r in fft)
    for method in ("LoRA",) + ESFT:
        stored = mean(r["stored_bytes"] for r in runs_of(task, method))
        lines.append(f"Storage, {method}: {stored:,.0f} bytes = {100 * stored / fft_bytes:.1f}% of FFT's "
                     f"{fft_bytes:,.0f}" + (" (paper: ESFT saves up to 90%)." if method in ESFT else "."))
    ours, random_runs = runs_of(task, "ESFT-Token"), runs_of(task, "Random experts")
    wins = sum(a["exact_match"] > b["exact_match"] for a, b in zip(ours, random_runs))
    lines.append(
        f"Selection vs random experts of the same count (paper Table 4): ESFT-Token {100 * mean(gains(task, ours)):+.1f} "
        f"vs random {100 * mean(gains(task, random_runs)):+.1f} points of exact match; ESFT-Token ahead on {wins} of "
        f"{len(ours)} seeds: " + ("held." if wins == len(ours) else "did not hold on every seed.")
    )
    timings = results.get("timings", {}).get(name, {})
    seconds = {m: [timings[f"{m}|{r['learning_rate']:g}|{r['seed']}"] for r in runs_of(task, m)
                   if f"{m}|{r['learning_rate']:g}|{r['seed']}" in timings] for m in METHODS}
    if seconds["FFT"] and all(seconds[m] for m in ESFT):
        saving = 1 - mean(seconds["ESFT-Token"] + seconds["ESFT-Gate"]) / mean(seconds["FFT"])
        lines.append(
            "Training time (paper: ESFT 19.8-20.9 min vs FFT 28.5 min per task, up to 30% saved): " + ", ".join(
                f"{m} {mean(seconds[m]):.1f} s" for m in METHODS)
            + f" per run here; ESFT {'saves' if saving >= 0 else 'costs'} {100 * abs(saving):.0f}% "
            + ("vs FFT: held. " if saving >= 0.2 else "vs FFT: did not hold. ")
            + "The frozen experts still run forward and backward-through-activations, so at this size the step "
            "cost hardly depends on what trains; times are from a busy shared CPU."
        )
    all_runs = runs_of(task, "All routed experts")
    lines.append(
        f"All routed experts trainable (everything else frozen): {100 * share_of_fft(task, 'All routed experts'):.0f}% "
        f"of FFT's gain, forgetting {mean(r['mean_forgetting'] for r in all_runs):+.3f}."
    )
    return lines


def task_section(name: str, task: dict, results: dict) -> list[str]:
    domains = results["domains"]
    n_total, n_experts = results["num_parameters"], results["model"]["n_routed_experts"]
    seeds = results["setting"]["seeds"]
    base = task["base_by_seed"]
    lines = [
        f"## Task: {TASK_TITLES.get(name, name)}",
        "",
        f"Target score: greedy exact match over the task's table; gain = after minus the base model on the same "
        f"table; share = a method's mean gain / FFT's mean gain. Forgetting: mean over the {len(domains)} "
        f"pre-training domains of the held-out loss increase (lower is better). Mean ± std over {len(seeds)} seed(s).",
        "",
        "| Method | LR | Target exact match ↑ | Share of FFT's gain | Target answer loss ↓ | Forgetting, mean Δ ↓ | "
        "Trainable params | Stored bytes | Training state bytes | Train s | Experts / MoE layer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| Base model | – | {fmt([b['exact_match'] for b in base.values()], 1, 100, suffix='%')} | – | "
        f"{fmt([b['answer_loss'] for b in base.values()])} | 0 | 0 | – | – | – | – |",
    ]
    timings = results.get("timings", {}).get(name, {})
    for method in METHODS + DIAGNOSTICS:
        runs = runs_of(task, method)
        if not runs:
            continue
        if method == DIAGNOSTICS[0]:
            lines.append("| *Diagnostics (at ESFT-Token's LR)* | | | | | | | | | | |")
        seconds = [timings.get(f"{method}|{run['learning_rate']:g}|{run['seed']}") for run in runs]
        seconds = [s for s in seconds if s is not None]
        trainable = mean(r["trainable_parameters"] for r in runs)
        lines.append(
            f"| {method} | {runs[0]['learning_rate']:g} | {fmt([r['exact_match'] for r in runs], 1, 100, suffix='%')} "
            f"| {100 * share_of_fft(task, method):.0f}% | {fmt([r['answer_loss'] for r in runs])} | "
            f"{fmt([r['mean_forgetting'] for r in runs], sign=True)} | {trainable:,.0f} ({100 * trainable / n_total:.1f}%)"
            f" | {mean(r['stored_bytes'] for r in runs):,.0f} | {mean(r['training_state_bytes'] for r in runs):,.0f} | "
            f"{fmt(seconds, 1) if seconds else '–'} | {experts_pattern(runs)} |"
        )
    lines += [
        "",
        f"Experts / MoE layer: selected experts in MoE layers 1/2/3 (of {n_experts}); every seed gave the listed "
        "pattern(s). Trainable params, bytes: means over seeds. Training state bytes: weights + gradients + AdamW "
        "state of the finished run, counted from the live model and optimizer (activations not included; no GPU, so "
        "no measured peak). Train s: the Trainer's `train_runtime` (noisy: a shared 2-core CPU).",
        "",
        "Held-out loss of each pre-training domain after adaptation:",
        "",
        "| Method | " + " | ".join(domains) + " |",
        "|---|" + "---|" * len(domains),
        "| Base model | " + " | ".join(f"{results['base_domain_losses'][d]:.3f}" for d in domains) + " |",
    ]
    for method in METHODS + DIAGNOSTICS:
        runs = runs_of(task, method)
        if runs:
            lines.append(f"| {method} | " + " | ".join(fmt([r["domain_losses"][d] for r in runs]) for d in domains)
                         + " |")
    lines += ["", "### Against the paper's claims", ""] + [f"- {line}" for line in claims(name, task, results)]
    selections = task["selections"][str(seeds[0])]
    lines += ["", f"Selections on seed {seeds[0]}:", ""]
    lines += [f"- {method}: " + ", ".join(f"layer {layer} → {ids}" for layer, ids in experts.items())
              for method, experts in selections.items()]
    lines += ["", f"LR sweep (seed {seeds[0]}; chosen = lowest target answer loss):", "",
              "| Method | LR | Target exact match | Target answer loss | Forgetting, mean Δ |", "|---|---|---|---|---|"]
    chosen = task["chosen_learning_rates"]
    for run in task["sweep"]:
        mark = " **(chosen)**" if chosen[run["method"]] == run["learning_rate"] else ""
        lines.append(f"| {run['method']} | {run['learning_rate']:g}{mark} | {100 * run['exact_match']:.1f}% | "
                     f"{run['answer_loss']:.3f} | {run['mean_forgetting']:+.3f} |")
    return lines + [""]


def routing_section(results: dict) -> list[str]:
    usage, halves = results["routing"]["usage"], results["routing"]["halves"]
    domains = results["domains"]
    layers = list(usage[domains[0]])
    k = results["model"]["num_experts_per_tok"]
    n = results["model"]["n_routed_experts"]
    pairs = [(a, b) for i, a in enumerate(domains) for b in domains[i + 1:]]
    lines = [
        "## Routing specialisation of the base model",
        "",
        f"Expert usage = ESFT-Token scores (share of the routed slots each expert gets), all tokens of unpacked "
        f"held-out examples. Top-{k} share: the share of the slots that a domain's {k} most used experts take "
        f"(uniform routing: {100 * k / n:.1f}%). Total variation between two usage distributions: 0 = the same "
        "experts, 1 = disjoint; the noise floor compares two disjoint halves of each domain's examples.",
        "",
        "| MoE layer | " + " | ".join(layers) + " |",
        "|---|" + "---|" * len(layers),
        "| TV, same domain (noise floor, mean) | " + " | ".join(
            f"{mean(total_variation(halves[d][0][l], halves[d][1][l]) for d in domains):.2f}" for l in layers) + " |",
        "| TV, between pre-training domains (mean of pairs) | " + " | ".join(
            f"{mean(total_variation(usage[a][l], usage[b][l]) for a, b in pairs):.2f}" for l in layers) + " |",
    ]
    for domain in list(usage):
        lines.append(f"| top-{k} share, {domain} | " + " | ".join(
            f"{100 * top_share(usage[domain][l], k):.0f}%" for l in layers) + " |")
    for target in [d for d in usage if d.startswith("target:")]:
        nearest = {l: min(domains, key=lambda d: total_variation(usage[target][l], usage[d][l])) for l in layers}
        lines.append(f"| {target}: closest pre-training domain (TV) | " + " | ".join(
            f"{nearest[l]} ({total_variation(usage[target][l], usage[nearest[l]][l]):.2f})" for l in layers) + " |")
    return lines + [""]


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    markers = {"FFT": "o", "LoRA": "s", "ESFT-Token": "^", "ESFT-Gate": "v", "Random experts": "x",
               "All routed experts": "D"}
    for axis, (name, task) in zip(axes[0], tasks.items()):
        for method, marker in markers.items():
            runs = runs_of(task, method)
            if runs:
                axis.scatter([r["mean_forgetting"] for r in runs], [100 * g for g in gains(task, runs)],
                             marker=marker, label=method, s=45)
        axis.set_xlabel("forgetting: mean held-out loss increase on pre-training domains")
        axis.set_ylabel("target gain: exact match points over the base")
        axis.set_title(name)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("ESFT vs LoRA vs FFT on a tiny DeepSeekMoE (one point per method and seed; up-left is better)",
                    fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def interpretation(results: dict) -> list[str]:
    """Why the claims held or not, from the numbers (each statement is conditioned on what it explains)."""
    n_experts, top_k = results["model"]["n_routed_experts"], results["model"]["num_experts_per_tok"]
    lines = []
    for name, task in results["tasks"].items():
        token, gate = share_of_fft(task, "ESFT-Token"), share_of_fft(task, "ESFT-Gate")
        everything = share_of_fft(task, "All routed experts")
        random_share = share_of_fft(task, "Random experts")
        counts = [n for run in runs_of(task, "ESFT-Token") for n in run["experts_per_layer"].values()]
        gate_counts = [n for run in runs_of(task, "ESFT-Gate") for n in run["experts_per_layer"].values()]
        text = (f"*{name}*: ESFT-Token trains {mean(counts):.1f} and ESFT-Gate {mean(gate_counts):.1f} of "
                f"{n_experts} routed experts per MoE layer ({100 * mean(counts) / n_experts:.0f}% / "
                f"{100 * mean(gate_counts) / n_experts:.0f}% of a layer's experts). ")
        if everything >= PARTLY and max(token, gate) < everything - 0.15:
            text += (f"Training every routed expert (attention, shared experts, embeddings still frozen) reaches "
                     f"{100 * everything:.0f}% of FFT's gain, so most of the new knowledge does fit in the routed "
                     f"experts; what ESFT lacks is capacity. With top-{top_k} routing over {n_experts} experts the "
                     "paper's thresholds (p 0.2 Token, 0.1 Gate) are met by one or two experts per layer, too few "
                     "weights to store a 100-pair table in the same budget; the paper's V2-Lite selections (2-15 of "
                     "64 experts per layer, top-6) trained 2-15 experts of 8.65M parameters each per layer.")
            if everything < HELD:
                text += (f" The rest of FFT's gain ({100 * (1 - everything):.0f}%) needs the parts ESFT freezes "
                         "(attention, shared experts, embeddings, LM head).")
        elif max(token, gate) >= HELD:
            text += "The selected experts hold enough capacity for the new table within the budget."
        else:
            text += (f"Even all routed experts reach only {100 * everything:.0f}% of FFT's gain: most of this "
                     "knowledge is not learnt by the routed experts alone in this budget.")
        if mean(gains(task, runs_of(task, "ESFT-Token"))) > mean(gains(task, runs_of(task, "Random experts"))) + 0.05:
            text += (f" The scores pick the experts that matter: the same number of random experts reaches "
                     f"{100 * random_share:.0f}% (ESFT-Token {100 * token:.0f}%).")
        else:
            text += (f" Random experts of the same count do about as well ({100 * random_share:.0f}% vs ESFT-Token "
                     f"{100 * token:.0f}%): this task's routing is spread over many experts (top-{top_k} share in "
                     "the routing table), so one expert per layer is no better placed than another.")
        fft_forget = mean(r["mean_forgetting"] for r in runs_of(task, "FFT"))
        esft_forget = mean(r["mean_forgetting"] for r in runs_of(task, "ESFT-Token"))
        gentle = min((r for r in task["sweep"] if r["method"] == "ESFT-Token"), key=lambda r: r["mean_forgetting"])
        if esft_forget >= fft_forget:
            text += (f" ESFT does not forget less here ({esft_forget:+.2f} vs FFT {fft_forget:+.2f}): the LR rule "
                     f"picks ESFT's aggressive LR ({runs_of(task, 'ESFT-Token')[0]['learning_rate']:g}, "
                     f"{runs_of(task, 'ESFT-Token')[0]['learning_rate'] / runs_of(task, 'FFT')[0]['learning_rate']:g}"
                     "x FFT's), which moves the few trained experts far, and every domain routes part of its tokens "
                     f"through them; at LR {gentle['learning_rate']:g} (sweep) ESFT-Token forgets "
                     f"{gentle['mean_forgetting']:+.2f} at {100 * gentle['exact_match']:.0f}% exact match.")
        else:
            text += (f" ESFT forgets less ({esft_forget:+.2f} vs FFT {fft_forget:+.2f}), partly because it learns "
                     "less: compare the points at equal gain in the plot.")
        lines.append(text)
    lines.append(
        "LoRA beats ESFT on both tasks, unlike in the paper: at hidden size 64, rank-8 LoRA on every module is "
        "24% of the model's parameters (at 16B it is well under 1%) and reaches attention too, so it is not the "
        "small baseline it is in the paper."
    )
    lines.append(
        "Scale: one 0.5M-parameter base, 100-pair tables, 100 steps. The training times are from a busy 2-core CPU "
        "running the experts as a loop; they say nothing about the methods' speed on a GPU at scale."
    )
    return lines


def protocol_section(results: dict) -> list[str]:
    setting, model = results["setting"], results["model"]
    grid = "; ".join(f"{m} {', '.join(f'{lr:g}' for lr in lrs)}" for m, lrs in setting["lr_grid"].items())
    return [
        "## Protocol (fixed before the final run)",
        "",
        f"- **Model**: `tiny_moe_config` — {model['num_hidden_layers']} layers (layer 0 dense), "
        f"{model['n_routed_experts']} routed + {model['n_shared_experts']} shared expert per MoE layer, "
        f"top-{model['num_experts_per_tok']}, hidden {model['hidden_size']}, expert width "
        f"{model['moe_intermediate_size']}; {results['num_parameters']:,} parameters, fp32.",
        f"- **Pre-training**: {setting['pretrain_steps']} steps × 32 samples of five synthetic domains "
        f"({', '.join(results['domains'])}; `synthetic.KNOWLEDGE_DOMAINS`, `make_mixed_corpus`, `pretrain`: LR 3e-3 "
        f"one-cycle, balance loss α=0.01, seed 0). The facts domain is a fixed table of 200 made-up facts `the code of "
        f"<name> is <NN>`. Loss {results['pretrain_loss_first']:.2f} → {results['pretrain_loss_last']:.2f} (last 20 "
        "steps). One base model for every run.",
        "- **Target tasks** (absent from pre-training; knowledge = a memorised mapping, which transformers store in "
        "their feed-forward weights, here the experts): *new_facts* — 100 facts about names not in the pre-training "
        "table, in the facts domain's format, a new table per seed; *new_operator* — the digit multiplication table "
        "`a x b = ab` written `7x3=21` (100 pairs), a new operator beside the pre-training's 2-digit `a+b=`. Score: "
        "greedy exact match of the answer over the whole table (the knowledge is the table itself, so the trained "
        "pairs are the test).",
        f"- **Budget, the same for every method**: one training file per task and seed "
        f"({setting['adapt_steps']} × {setting['batch_size']} rows drawn from the table with the seed), prompt-completion "
        f"format, loss on the answer + EOS; {setting['adapt_steps']} steps × batch {setting['batch_size']}, constant "
        "LR, no warm-up, no weight decay, AdamW (β 0.9/0.999), clip 1.0, aux loss off, the Trainer seeded with the "
        "seed, fp32, one CPU thread.",
        "- **Methods, through the shipped entry points**: *FFT* — `run_sft` with every parameter trainable "
        "(`--train_router true`, as the paper's FFT); *LoRA* — `run_sft --use_peft` with the defaults (r 8, α 16, "
        "on attention, routed experts, shared experts and dense MLP: everything but embeddings, LM head, norms and "
        "routers, as in the paper); *ESFT-Token* (p 0.2) / *ESFT-Gate* (p 0.1) — `scoring_sequences` + "
        f"`score_experts` on the training file ({setting['probe_sequences']} × {setting['probe_length']}-token probe "
        "sequences, answer tokens scored) on the base, `select_experts`, then `run_esft --expert_config`. "
        "Diagnostics through `run_esft`: *random experts* (ESFT-Token's count per layer, drawn with the seed) and "
        "*all routed experts*. Every ESFT-family model is loaded back from its saved adapter and checked: only its "
        "selected experts differ from the base.",
        f"- **LR grid**: {grid}. Per task and method the LR with the lowest target answer loss on seed "
        f"{setting['seeds'][0]} is kept for the other seeds; diagnostics use ESFT-Token's. (Selection on the trained "
        "table itself: for a memorisation task there is no other split.) The paper's LRs (FFT 3e-5, LoRA 1e-4, ESFT "
        "1e-5 at 16B) are far too small for a 0.5M-parameter model over "
        f"{setting['adapt_steps']} steps; the grids keep its ordering.",
        f"- **Seeds** {', '.join(map(str, setting['seeds']))}: a seed changes the training file (and the new_facts "
        "table), the data order, the ESFT probe, the LoRA init and the random-expert draw; the base model and the "
        f"held-out sets ({setting['heldout_per_domain']} examples per pre-training domain) are fixed.",
        f"- **Verdicts**: a share of FFT's gain counts as held at ≥ {100 * HELD:.0f}%, partly held at ≥ "
        f"{100 * PARTLY:.0f}%; \"forgets less\" must hold on every seed; storage is compared in bytes of the saved "
        "output (FFT: the whole model; LoRA: the PEFT adapter; ESFT: the ESFT adapter, selected experts only).",
        f"- **Pilot** (disclosed because it came first): {PILOT}",
        "",
    ]


def less(task: dict, method: str, other: str) -> int:
    return sum(a["mean_forgetting"] < b["mean_forgetting"] for a, b in zip(runs_of(task, method), runs_of(task, other)))


def summary_lines(results: dict) -> list[str]:
    lines = []
    for name, task in results["tasks"].items():
        shares = {m: share_of_fft(task, m) for m in ("ESFT-Token", "ESFT-Gate", "LoRA")}
        forget = {m: mean(r["mean_forgetting"] for r in runs_of(task, m)) for m in METHODS}
        lines.append(
            f"- **{name}**: ESFT-Token {100 * shares['ESFT-Token']:.0f}% and ESFT-Gate {100 * shares['ESFT-Gate']:.0f}% "
            f"of FFT's exact-match gain (LoRA {100 * shares['LoRA']:.0f}%; FFT "
            f"{100 * mean(r['exact_match'] for r in runs_of(task, 'FFT')):.0f}% exact match from "
            f"{100 * mean(b['exact_match'] for b in task['base_by_seed'].values()):.0f}%). Forgetting (mean Δ loss): "
            + ", ".join(f"{m} {forget[m]:+.2f}" for m in METHODS) + "; "
            + "; ".join(
                f"{m} forgets less than FFT on {less(task, m, 'FFT')} and than LoRA on {less(task, m, 'LoRA')} "
                f"of {len(runs_of(task, m))} seeds" for m in ESFT) + "."
        )
    return lines


def render(json_path: Path | str, md_path: Path | str, plot_path: Path | str | None = None) -> Path:
    json_path, md_path = Path(json_path), Path(md_path)
    results = json.loads(json_path.read_text())
    if plot_path is None:
        stem = json_path.stem
        plot_path = json_path.parent / f"{stem}_gain_vs_forgetting.png"
    plot_path = plot(results, Path(plot_path))
    env, timings = results["environment"], results.get("timings", {})

    def relative(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(md_path.parent.resolve()))
        except ValueError:
            return str(path)

    lines = [
        "# ESFT vs LoRA vs FFT on a tiny DeepSeekMoE, through the shipped trainer",
        "",
        f"Generated by `{results['command']}` (then `python benchmarks/esft_report.py` renders this file from "
        f"[`{relative(json_path)}`]({relative(json_path)})). The same command gives the same JSON apart from its "
        "`timings` (one CPU thread, fixed seeds).",
        "",
        "**Claims tested** (ESFT paper, arXiv 2407.01906): training only the routed experts a task uses gets close to "
        "full fine-tuning on that task (Table 1: ESFT-Token 91%, ESFT-Gate 95% of FFT's gain; LoRA 65%), forgets "
        "less than FFT and LoRA (Table 2), stores far less than FFT (Fig. 5), and the selected experts beat random "
        "ones (Table 4).",
        "",
        "**Headline, per target task:**",
        "",
        *summary_lines(results),
        "",
        f"![target gain vs forgetting]({relative(plot_path)})",
        "",
        *protocol_section(results),
    ]
    for name, task in results["tasks"].items():
        lines += task_section(name, task, results)
    lines += routing_section(results)
    lines += ["## Interpretation", ""] + [f"- {line}" for line in interpretation(results)] + [""]
    lines += [
        "## Environment and cost",
        "",
        f"- Command: `{results['command']}`; device: {env['cpu']}, torch threads {env['torch_threads']}, "
        f"CUDA {'yes' if env['cuda'] else 'no'}.",
        f"- Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"trl {env['trl']}.",
    ]
    if timings:
        lines.append(f"- Wall time {timings.get('wall', float('nan')) / 60:.1f} min, of which pre-training "
                     f"{timings.get('pretrain', float('nan')):.0f} s; {timings.get('process_cpu', float('nan')) / 60:.1f} min of "
                     "CPU time in the process (a 2-core machine shared with other jobs).")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    json_path = Path(argv[0]) if argv else HERE / "results" / "esft_vs_lora.json"
    md_path = Path(argv[1]) if len(argv) > 1 else HERE / "esft_vs_lora.md"
    print(render(json_path, md_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
