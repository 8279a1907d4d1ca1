"""Argument checks of the analysis that need no torch (the CLI parser imports this module only)."""

import math
from collections.abc import Sequence
from fractions import Fraction


ABLATION_MODES = ("top_per_token", "random_per_token", "most_loaded", "random_experts")
DEFAULT_RATIOS = (1 / 16, 2 / 16, 3 / 16, 4 / 16)


def parse_ratios(text: str) -> list[float]:
    """'1/16,0.125, 3/16' -> [0.0625, 0.125, 0.1875]."""
    ratios = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            ratios.append(float(Fraction(item)))
        except (ValueError, ZeroDivisionError) as err:
            raise ValueError(f"Ablation ratio {item!r} is not a number or fraction (e.g. 0.0625 or 1/16).") from err
    if not ratios:
        raise ValueError("No ablation ratio given; pass e.g. --ablation_ratios 1/16,2/16,3/16,4/16.")
    return ratios


def experts_for_ratio(ratio: float, num_experts: int, top_k: int) -> int:
    """Number of routed experts disabled for `ratio`, checked to leave at least `top_k` experts per token."""
    if not 0 < ratio < 1:
        raise ValueError(f"Ablation ratio {ratio} must be between 0 and 1 (exclusive).")
    count = math.floor(ratio * num_experts + 0.5)  # round half up
    if count < 1:
        raise ValueError(
            f"Ablation ratio {ratio} disables no expert of {num_experts}; use a ratio of at least "
            f"{1 / num_experts:.4g}."
        )
    if num_experts - count < top_k:
        raise ValueError(
            f"Ablation ratio {ratio} disables {count} of {num_experts} routed experts, leaving fewer than the "
            f"{top_k} each token uses; use a ratio of at most {(num_experts - top_k) / num_experts:.4g}."
        )
    return count


def check_moe_layer(layer: int, moe_layers: Sequence[int]) -> int:
    """`layer` if it is one of `moe_layers`, else a ValueError naming the valid choices."""
    if layer not in moe_layers:
        raise ValueError(
            f"Layer {layer} is not a MoE layer of this model (it is dense or out of range); pass --layer (layer=) "
            f"with one of the MoE layers {moe_layers[0]}..{moe_layers[-1]}: {list(moe_layers)}."
        )
    return layer
