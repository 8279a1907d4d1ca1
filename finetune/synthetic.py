"""A synthetic multi-domain corpus and a short pre-training run, so that a tiny DeepSeekMoE's routing specialises by
domain: what the demo and the ESFT-vs-LoRA experiment start from. Same seed, same data, same model."""

import random
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from modeling_deepseekmoe import DeepseekMoEConfig, DeepseekMoEForCausalLM
from modeling_deepseekmoe.tokenization import DEFAULT_CORPUS_PATH


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}={a + b}"


def _reversal(rng: random.Random) -> str:
    word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))
    return f"reverse {word} -> {word[::-1]}"


def _key_value(rng: random.Random) -> str:
    keys = rng.sample("pqrstuvw", 3)
    values = [rng.randint(0, 9) for _ in keys]
    query = rng.randrange(3)
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"{pairs} ; {keys[query]}? {values[query]}"


_TEXT_LINES: list[str] = []


def _plain_text(rng: random.Random) -> str:
    if not _TEXT_LINES:
        lines = DEFAULT_CORPUS_PATH.read_text(encoding="utf-8").splitlines()
        _TEXT_LINES.extend(line for line in lines if line.isascii() and 20 <= len(line) <= 120)
    return rng.choice(_TEXT_LINES)


DOMAINS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic,
    "reversal": _reversal,
    "key_value": _key_value,
    "text": _plain_text,
}


def make_corpus(samples_per_domain: int, seed: int = 0, domains: list[str] | None = None) -> list[dict]:
    """[{"text", "domain"}], domains interleaved, deterministic for a seed."""
    rng = random.Random(seed)
    names = domains or list(DOMAINS)
    rows = [{"text": DOMAINS[name](rng), "domain": name} for _ in range(samples_per_domain) for name in names]
    rng.shuffle(rows)
    return rows


def task_conversations(domain: str, count: int, seed: int = 0) -> list[dict]:
    """Chat-format examples of one domain: the question part as the user turn, the answer as the assistant turn."""
    rng = random.Random(seed)
    separators = {"arithmetic": "=", "reversal": "->", "key_value": "?"}
    if domain not in separators:
        raise ValueError(f"No chat task for domain {domain!r}; use one of {sorted(separators)}.")
    rows = []
    for _ in range(count):
        prompt, answer = DOMAINS[domain](rng).rsplit(separators[domain], 1)
        rows.append({"messages": [
            {"role": "user", "content": prompt + separators[domain]},
            {"role": "assistant", "content": answer.strip()},
        ]})
    return rows


def tiny_moe_config(tokenizer_size: int, **overrides) -> DeepseekMoEConfig:
    """The released structure at toy size (dense first layer, shared + routed experts, padded embedding)."""
    values = dict(
        vocab_size=(tokenizer_size + 63) // 64 * 64,
        hidden_size=64,
        intermediate_size=192,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        bos_token_id=tokenizer_size - 2,
        eos_token_id=tokenizer_size - 1,
        aux_loss_alpha=0.01,
    )
    values.update(overrides)
    return DeepseekMoEConfig(**values)


def encode_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            [text + tokenizer.eos_token for text in texts[start : start + batch_size]],
            padding=True, truncation=True, max_length=max_length, return_tensors="pt",
        )  # fmt: skip
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        batches.append({**encoded, "labels": labels})
    return batches


def pretrain(
    tokenizer,
    corpus: list[dict],
    config: DeepseekMoEConfig | None = None,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[DeepseekMoEForCausalLM, list[float]]:
    """Pre-train a tiny DeepSeekMoE from scratch on `corpus` (language modelling on every token, with the balance
    loss), long enough for routing to specialise. Returns the model (eval mode) and the loss curve."""
    torch.manual_seed(seed)
    model = DeepseekMoEForCausalLM(config or tiny_moe_config(len(tokenizer)))
    model.apply_generation_defaults(tokenizer_size=len(tokenizer))
    batches = encode_batches(tokenizer, [row["text"] for row in corpus], batch_size, max_length=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="Pre-training", disable=not show_progress):
        batch = batches[step % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


@torch.no_grad()
def domain_losses(model, tokenizer, corpus: list[dict], batch_size: int = 64) -> dict[str, float]:
    """Mean next-token loss per domain."""
    losses = {}
    for domain in sorted({row["domain"] for row in corpus}):
        texts = [row["text"] for row in corpus if row["domain"] == domain]
        total = count = 0.0
        for batch in encode_batches(tokenizer, texts, batch_size, max_length=64):
            tokens = (batch["labels"][:, 1:] != -100).sum().item()
            total += model(**batch).loss.item() * tokens
            count += tokens
        losses[domain] = total / count
    return losses


# --------------------------------------------------------------------------------------------------------------------
# Knowledge tasks: new facts in a domain the model already routes to a few experts (the ESFT experiment and demo).
# Their answers are memorised mappings, which a transformer stores in its feed-forward (here: expert) weights.

_SYLLABLES = [c + v for c in "bdgklmnprstvz" for v in "aeiou"]
PRETRAIN_FACTS_SEED, PRETRAIN_FACTS_COUNT = 1234, 200


def fact_table(count: int, seed: int, exclude=frozenset()) -> dict[str, int]:
    """`count` made-up two-syllable names (none in `exclude`) with a code 10-99 each, deterministic for a seed."""
    rng, table = random.Random(seed), {}
    if count > len(_SYLLABLES) ** 2 - len(exclude):
        raise ValueError(f"At most {len(_SYLLABLES) ** 2 - len(exclude)} fact names are available, not {count}.")
    while len(table) < count:
        name = rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)
        if name not in exclude and name not in table:
            table[name] = rng.randint(10, 99)
    return table


def fact_pair(name: str, code: int) -> tuple[str, str]:
    """(prompt, answer) of one fact: "the code of bako is" -> " 47"."""
    return f"the code of {name} is", f" {code}"


_PRETRAIN_FACTS: dict[str, int] = {}


def pretrain_facts() -> dict[str, int]:
    """The facts of the "facts" pre-training domain (a fixed table)."""
    if not _PRETRAIN_FACTS:
        _PRETRAIN_FACTS.update(fact_table(PRETRAIN_FACTS_COUNT, PRETRAIN_FACTS_SEED))
    return _PRETRAIN_FACTS


def _facts(rng: random.Random) -> str:
    table = pretrain_facts()
    name = rng.choice(sorted(table))
    return "".join(fact_pair(name, table[name]))


def product_table(low: int = 0, high: int = 9, symbol: str = "x") -> list[tuple[str, str]]:
    """A new arithmetic operator over digits: (prompt, answer) pairs "7x3=" -> "21", every pair from low to high."""
    return [(f"{a}{symbol}{b}=", str(a * b)) for a in range(low, high + 1) for b in range(low, high + 1)]


KNOWLEDGE_DOMAINS: dict[str, Callable[[random.Random], str]] = {**DOMAINS, "facts": _facts}


def make_mixed_corpus(samples_per_domain: int, seed: int, generators: dict[str, Callable[[random.Random], str]]):
    """`make_corpus` over any generators (e.g. `KNOWLEDGE_DOMAINS`): [{"text", "domain"}], deterministic for a seed."""
    rng = random.Random(seed)
    rows = [{"text": make(rng), "domain": name} for _ in range(samples_per_domain) for name, make in generators.items()]
    rng.shuffle(rows)
    return rows


def pair_conversations(pairs: list[tuple[str, str]]) -> list[dict]:
    """Chat-format rows of (prompt, answer) pairs: the prompt as the user turn, the answer as the assistant turn."""
    return [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer.strip()}]}
            for prompt, answer in pairs]
