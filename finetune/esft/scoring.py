"""ESFT expert scores (paper §3.3, Eq. 5-6), from the stock model's routers.

For MoE layer l and routed expert i, over N_s probe sequences with L_j scored tokens each:
- ESFT-Gate:  g_i = 1/N_s * sum_j 1/L_j * sum_k g_{i,k}, g_{i,k} the routing weight of i for token k (0 if not chosen);
- ESFT-Token: r_i = 1/N_s * sum_j 1/L_j * sum_k 1(i chosen for k) / K.
Scores are averaged per layer (token scores sum to 1 in each layer; gate scores to the mean selected routing mass),
not divided by their sum across layers as the public ESFT code does (its issue #17).
"""

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_deepseekmoe.routing import record_routing


SCORE_TYPES = ("gate", "token")
# Config values scores must share with the model they are used on.
SCORED_CONFIG_KEYS = ("num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "hidden_size")


@dataclass
class ExpertScores:
    gate: dict[int, list[float]]  # {MoE layer: [score per routed expert]}
    token: dict[int, list[float]]
    num_sequences: int
    num_tokens: int
    config: dict

    def to_json(self) -> dict:
        return {
            "gate": {str(layer): values for layer, values in self.gate.items()},
            "token": {str(layer): values for layer, values in self.token.items()},
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "config": self.config,
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertScores":
        data = json.loads(Path(path).read_text())
        try:
            return cls(
                gate={int(k): v for k, v in data["gate"].items()},
                token={int(k): v for k, v in data["token"].items()},
                num_sequences=data["num_sequences"],
                num_tokens=data["num_tokens"],
                config=data["config"],
            )
        except KeyError as err:
            raise ValueError(f"{path} is not an ESFT scores file (missing {err}).") from err

    def check_finite(self, source: str) -> None:
        """Refuse NaN/inf scores (a model with non-finite weights routes with NaN weights): they select every expert."""
        bad = sorted({layer for values in (self.gate, self.token) for layer, scores in values.items()
                      if not all(math.isfinite(score) for score in scores)})
        if bad:
            raise ValueError(f"The expert scores of MoE layer(s) {bad} from {source} are NaN/inf: the model's routing "
                             "is not finite (NaN/inf weights, e.g. from a diverged run). Score a model with finite "
                             "weights.")

    def check_matches(self, config) -> None:
        mismatched = {k: (v, getattr(config, k, None)) for k, v in self.config.items() if getattr(config, k, None) != v}
        if mismatched:
            details = ", ".join(f"{k}: scores {a!r} vs model {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"These expert scores come from a different model ({details}); score this model again.")


def pack_for_scoring(
    examples: Iterable[dict], sequence_length: int, num_sequences: int
) -> list[dict[str, torch.Tensor]]:
    """Concatenate tokenized examples (`input_ids`, optional `score_mask`) into `num_sequences` probe sequences of
    `sequence_length` tokens (the paper's 32 x 4096), the last one possibly shorter."""
    sequences, ids, mask = [], [], []
    for example in examples:
        example_ids = list(example["input_ids"])
        ids.extend(example_ids)
        mask.extend(example.get("score_mask") or [1] * len(example_ids))
        while len(ids) >= sequence_length and len(sequences) < num_sequences:
            sequences.append({"input_ids": torch.tensor(ids[:sequence_length]),
                              "score_mask": torch.tensor(mask[:sequence_length])})
            ids, mask = ids[sequence_length:], mask[sequence_length:]
        if len(sequences) == num_sequences:
            break
    if ids and len(sequences) < num_sequences:
        sequences.append({"input_ids": torch.tensor(ids), "score_mask": torch.tensor(mask)})
    if not sequences:
        raise ValueError("No tokens to score: the probe data is empty.")
    return sequences


def scoring_sequences(
    dataset,
    tokenizer,
    sequence_length: int = 4096,
    num_sequences: int = 32,
    all_tokens: bool = False,
    data_format: str = "auto",
) -> list[dict[str, torch.Tensor]]:
    """Probe sequences from SFT-format data (a path or a `datasets.Dataset`; validated and tokenized exactly as for
    training): the tokens training learns from (assistant answers of conversations, completions) are scored, or all
    tokens with `all_tokens`."""
    from ..data import prepare_sft_dataset

    tokenized = prepare_sft_dataset(
        dataset, tokenizer, data_format=data_format, assistant_only_loss=not all_tokens,
        completion_only_loss=not all_tokens, max_length=None,
    )  # fmt: skip
    examples = (
        {"input_ids": row["input_ids"],
         "score_mask": None if all_tokens else [int(label != -100) for label in row["labels"]]}
        for row in tokenized
    )  # fmt: skip
    return pack_for_scoring(examples, sequence_length, num_sequences)


@torch.no_grad()
def score_experts(model, sequences: list[dict[str, torch.Tensor]], show_progress: bool = True) -> ExpertScores:
    """ESFT-Gate and ESFT-Token scores of every routed expert over `sequences` (dicts with `input_ids` [T] and
    `score_mask` [T], 1 for the tokens that count: the assistant tokens training will learn from, by default).
    Runs one sequence at a time, so memory does not grow with the sample; works on a quantized model too."""
    config = model.config
    num_experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    device = next(model.parameters()).device
    gate_sums: dict[int, torch.Tensor] = {}
    token_sums: dict[int, torch.Tensor] = {}
    num_sequences = num_tokens = 0
    was_training = model.training
    model.eval()
    with record_routing(model, keep_scores=False) as routing:
        for sequence in tqdm(sequences, desc="Scoring experts", disable=not show_progress):
            mask = sequence["score_mask"].to(device=device, dtype=torch.float32)
            scored = int(mask.sum())
            if scored == 0:
                continue
            model(sequence["input_ids"][None].to(device), use_cache=False)
            gate, token = routing.expert_weight_sums(mask), routing.expert_counts(mask)
            for layer in routing.outputs:
                gate_sums[layer] = gate_sums.get(layer, 0) + gate[layer] / scored
                token_sums[layer] = token_sums.get(layer, 0) + token[layer] / (scored * top_k)
            num_sequences += 1
            num_tokens += scored
    model.train(was_training)
    if num_sequences == 0:
        raise ValueError("No sequence has a token to score (all masked); use all tokens or other data.")
    scores = ExpertScores(
        gate={layer: (values / num_sequences).tolist() for layer, values in sorted(gate_sums.items())},
        token={layer: (values / num_sequences).tolist() for layer, values in sorted(token_sums.items())},
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        config={key: getattr(config, key) for key in SCORED_CONFIG_KEYS},
    )
    scores.check_finite(getattr(config, "name_or_path", None) or "this model")
    return scores
