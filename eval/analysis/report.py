"""The short markdown report of an analysis run (`report.md`), written from the results dictionary."""

from pathlib import Path


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value).replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return lines + [""]


def _summary_section(results: dict) -> list[str]:
    data, routing = results["data"], results["routing"]
    loss = results["loss"]
    lines = ["# DeepSeekMoE routing analysis", ""]
    lines += [
        f"- model: `{results['model']}`",
        f"- data: {data['samples']} texts, {int(routing['tokens'][0])} tokens, domains: "
        + ", ".join(f"{name} ({count})" for name, count in data["domains"].items()),
        f"- MoE layers: {routing['layers'][0]}..{routing['layers'][-1]}, {routing['num_experts']} routed experts, "
        f"top-{results['top_k']}; detail layer: {results['layer']}",
        f"- loss: {loss['loss']:.4f} nats/token (perplexity {loss['perplexity']:.2f}) over {loss['tokens']} "
        "predicted tokens",
        "",
    ]
    return lines


def _balance_section(results: dict) -> list[str]:
    routing = results["routing"]
    balance = routing["balance"]
    rows = []
    for row, layer in enumerate(routing["layers"]):
        load = routing["load_share"][row]
        top = sorted(range(len(load)), key=lambda e: -load[e])[:3]
        rows.append(
            [
                layer,
                balance["cv"][row],
                balance["normalized_entropy"][row],
                balance["max_over_mean"][row],
                int(balance["unused_experts"][row]),
                ", ".join(f"{e} ({load[e]:.3f})" for e in top),
            ]
        )
    note = (
        "Load share = fraction of routing slots; uniform is 1/E. CV = std/mean of the load (0 = balanced), entropy "
        "normalised to 1 = balanced."
    )
    lines = ["## Load balance", "", note, ""]
    return lines + _table(["layer", "CV", "norm. entropy", "max/mean", "unused", "most loaded (share)"], rows)


def _domain_section(results: dict, top_tokens: int = 5) -> list[str]:
    routing, layer = results["routing"], str(results["layer"])
    lines = []
    if routing["specialisation"]:
        lines += ["## Domains", "", "Specialisation = total variation distance between a domain's expert-load "
                  "distribution and that of the other domains' tokens (0: same experts, 1: disjoint).", ""]
        rows = []
        for domain, scores in routing["specialisation"].items():
            best = max(range(len(scores)), key=lambda i: scores[i])
            top = routing["domains"][domain]["top_experts"][layer][:6]
            best_text = f"{scores[best]:.3f} (layer {routing['layers'][best]})"
            rows.append([domain, sum(scores) / len(scores), best_text, top])
        lines += _table(["domain", "mean specialisation", "max", f"top experts, layer {layer}"], rows)
    counters = routing["top_tokens"][layer]
    row = routing["layers"].index(results["layer"])
    load = routing["load_share"][row]
    busiest = sorted(range(len(load)), key=lambda e: -load[e])[:8]
    rows = [
        [e, f"{load[e]:.3f}", " ".join(repr(token) for token, _ in counters[e]["tokens"][:top_tokens])]
        for e in busiest
    ]
    lines += [f"## Top tokens of the most loaded experts, layer {layer}", ""]
    return lines + _table(["expert", "load share", "top tokens"], rows)


def _ablation_section(results: dict) -> list[str]:
    ablations = results.get("ablations")
    if not ablations:
        return []
    rows = [["baseline", "-", 0, ablations["baseline"]["loss"], 0.0]]
    rows += [[r["variant"], f"{r['ratio']:.4g}", r["num_disabled"], r["loss"], r["delta"]] for r in ablations["rows"]]
    rows += [[f"{r['variant']} (k={r['top_k']})", "-", "-", r["loss"], r["delta"]] for r in ablations["shared"]]
    lines = ["## Ablations (paper Section 4.5)", "", "Disabled experts are masked after the softmax; tokens take the "
             "top-k of the rest, not renormalised. top_per_token: each token's highest-probability experts; "
             "most_loaded: the layer's most loaded experts on this data; random_*: the random baselines.", ""]
    return lines + _table(["variant", "ratio", "experts disabled", "loss", "delta"], rows)


def _static_section(results: dict) -> list[str]:
    static = results.get("static")
    if not static:
        return []
    if "error" in static:
        return ["## Static analyses", "", f"Skipped: {static['error']}", ""]
    rows = []
    for layer, entry in sorted(static["layers"].items(), key=lambda item: int(item[0])):
        similarity, alignment = entry["similarity"]["all"], entry["router_alignment"]
        rows.append(
            [
                layer,
                similarity["routed_mean"],
                similarity["routed_max"],
                similarity.get("routed_shared_mean", "-"),
                alignment["pearson_gate"],
                alignment["pearson_up"],
                alignment["pearson_down"],
                f"{alignment['matched_cosine_mean']:.3f} / {alignment['mismatched_cosine_mean']:.3f}",
            ]
        )
    note = (
        "Cosine of the flattened expert weights (gate, up, down concatenated); shared experts compared as slices of "
        "width moe_intermediate_size. Pearson R: router-row similarity vs neuron-averaged projection similarity over "
        "expert pairs. Last column: cosine of each router row with its own expert's averaged gate_proj / with the "
        "other experts'."
    )
    lines = ["## Static analyses (Lo et al. 2024)", "", note, ""]
    header = ["layer", "routed mean cos", "routed max cos", "routed-shared mean", "R gate", "R up", "R down"]
    header.append("own / other")
    return lines + _table(header, rows)


def _norm_section(results: dict) -> list[str]:
    norms = results.get("output_norms")
    if not norms:
        return []
    rows = [
        [layer, s["tokens"], s["spearman"], s["top1_agreement"], s["topk_overlap"]]
        for layer, s in sorted(norms.items(), key=lambda item: int(item[0]))
    ]
    lines = ["## Expert output norm vs router score", "", "Every routed expert run on each token; Spearman = rank "
             "correlation across experts of score and output norm, averaged over tokens.", ""]
    return lines + _table(["layer", "tokens", "Spearman", "top-1 agreement", "top-k overlap"], rows)


def write_report(results: dict, path: str | Path) -> Path:
    """Write `report.md` from the results of `analyze`."""
    lines = _summary_section(results) + _balance_section(results) + _domain_section(results)
    lines += _ablation_section(results) + _static_section(results) + _norm_section(results)
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in results["files"] if name.endswith(".png")] + [""]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
