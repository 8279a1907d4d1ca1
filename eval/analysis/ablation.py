"""Expert ablations in the spirit of the DeepSeekMoE paper, Section 4.5: the loss on the given data when routed
experts are disabled, and without the shared experts.

Disabled experts are masked after the router's softmax; every token takes the top-k of the remaining probabilities,
not renormalised (`hooks.reroute`). For a ratio rho of the E routed experts, r = rho * E rounded half up experts
are disabled (1/16 of 64 experts is 4), in one of four ways:

- `top_per_token`: each token's r highest-probability experts (the paper's Figure 4);
- `random_per_token`: r experts per token drawn at random, the baseline for the above;
- `most_loaded`: in every layer the r experts with the highest load share on the data, for all tokens;
- `random_experts`: r experts per layer drawn at random, for all tokens, the baseline for the above.

Without shared experts the shared MLPs are skipped, with the model's k routed experts (`no_shared`) and with k plus
the number of shared experts (`no_shared_more_routed`, the paper's compute-matched variant: 1.808 -> 2.414 on the
2B model).
"""

import random
from collections.abc import Sequence
from contextlib import ExitStack

from torch import nn

from .data import EncodedSample
from modeling_deepseekmoe.routing import moe_blocks

from .hooks import routing_override, without_shared_experts
from .options import ABLATION_MODES, DEFAULT_RATIOS, experts_for_ratio
from .passes import LossResult, evaluate_loss
from .statistics import RoutingStatistics


def random_expert_sets(layers: Sequence[int], num_experts: int, count: int, seed: int) -> dict[int, list[int]]:
    """layer -> `count` distinct experts drawn at random (reproducible from `seed`)."""
    rng = random.Random(seed)
    return {layer: sorted(rng.sample(range(num_experts), count)) for layer in layers}


def _override(
    mode: str, count: int, statistics: RoutingStatistics | None, layers: list[int], num_experts: int, seed: int
) -> dict:
    """Arguments of `routing_override` for one ablation."""
    if mode == "top_per_token":
        return {"per_token_top_r": count}
    if mode == "random_per_token":
        return {"per_token_random_r": count, "seed": seed}
    if mode == "most_loaded":
        return {"disabled": statistics.most_loaded_experts(count)}
    if mode == "random_experts":
        return {"disabled": random_expert_sets(layers, num_experts, count, seed)}
    raise ValueError(f"Unknown ablation mode {mode!r}; choose from {ABLATION_MODES}.")


def _row(name: str, loss: LossResult, baseline: LossResult, **fields) -> dict:
    delta = loss.loss - baseline.loss
    return {"variant": name, **fields, "loss": loss.loss, "delta": delta, "tokens": loss.num_tokens}


def run_ablations(
    model: nn.Module,
    samples: Sequence[EncodedSample],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    statistics: RoutingStatistics | None = None,
    baseline: LossResult | None = None,
    modes: Sequence[str] = ABLATION_MODES,
    shared: bool = True,
    random_trials: int = 1,
    batch_size: int = 4,
    pad_token_id: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Loss of the model on `samples` under every (mode, ratio), averaged over `random_trials` draws for the random
    modes, and without shared experts. `statistics` (from `collect_routing_statistics`) ranks the experts for
    `most_loaded`; `baseline` is the unablated loss when already known."""
    blocks = moe_blocks(model)
    layers = list(blocks)
    gate = blocks[layers[0]].gate
    num_experts, top_k = gate.weight.shape[0], gate.top_k
    counts = {ratio: experts_for_ratio(ratio, num_experts, top_k) for ratio in ratios}
    unknown = [mode for mode in modes if mode not in ABLATION_MODES]
    if unknown:
        raise ValueError(f"Unknown ablation mode(s) {unknown}; choose from {list(ABLATION_MODES)}.")
    if "most_loaded" in modes and statistics is None:
        raise ValueError(
            "The 'most_loaded' ablation needs routing statistics; pass statistics=collect_routing_statistics(...)[0]."
        )

    def loss(desc: str) -> LossResult:
        return evaluate_loss(model, samples, batch_size, pad_token_id, progress=progress, desc=desc)

    baseline = baseline or loss("baseline")
    rows = []
    for mode in modes:
        trials = random_trials if mode.startswith("random") else 1
        for ratio, count in counts.items():
            losses = []
            for trial in range(trials):
                with routing_override(model, **_override(mode, count, statistics, layers, num_experts, seed + trial)):
                    losses.append(loss(f"{mode} {ratio:.4g}").loss)
            mean = LossResult(sum(losses) / len(losses), baseline.num_tokens)
            rows.append(_row(mode, mean, baseline, ratio=ratio, num_disabled=count, trial_losses=losses))
    result = {
        "baseline": {"loss": baseline.loss, "perplexity": baseline.perplexity, "tokens": baseline.num_tokens},
        "num_experts": num_experts,
        "top_k": top_k,
        "ratios": list(ratios),
        "rows": rows,
        "shared": [],
    }
    if shared and any(block.shared_experts is not None for block in blocks.values()):
        result["shared"] = _shared_ablations(model, loss, baseline, top_k)
    return result


def _shared_ablations(model: nn.Module, loss, baseline: LossResult, top_k: int) -> list[dict]:
    num_shared = model.config.n_shared_experts or 0
    rows = []
    for name, k in (("no_shared", top_k), ("no_shared_more_routed", top_k + num_shared)):
        with ExitStack() as stack:
            stack.enter_context(without_shared_experts(model))
            if k != top_k:
                stack.enter_context(routing_override(model, top_k=k))
            rows.append(_row(name, loss(name), baseline, top_k=k))
    return rows
