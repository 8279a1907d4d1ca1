"""Local data for the routing analysis: `.txt` files (one text per line) and `.jsonl` files (one JSON object per line,
in any row format `sft` reads: `messages`, ShareGPT `conversations`, Alpaca `instruction`/`input`/`output`,
`prompt`/`completion`, or a text field; an optional domain field), tokenised once and batched with right padding.
Conversations are rendered through the tokenizer's chat template (the DeepSeek one when it has none), as training
sees them."""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deepseekmoe.finetune.formats import MESSAGES, TEXT, format_error, row_format, standardize_row
from modeling_deepseekmoe.tokenization import install_chat_template


SUPPORTED_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class TextSample:
    text: str
    domain: str


@dataclass(frozen=True)
class EncodedSample:
    input_ids: tuple[int, ...]
    domain: str


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 for real tokens
    domains: list[str]  # one per row


def render_conversation(tokenizer, messages: list[dict]) -> str:
    """A conversation as the chat template renders it, without the leading BOS the tokenizer adds again."""
    install_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise ValueError(f"{where} is not a non-empty list of {{'role': str, 'content': str}} messages; fix the row.")
    return value


def row_text(row: dict, text_field: str, tokenizer=None, where: str = "row") -> str:
    """The text of one data row in any supported format (conversations rendered through the chat template)."""
    row = standardize_row(row)
    data_format = row_format(row, text_field)
    if data_format is None:
        raise ValueError(
            f"{where} has no {text_field!r} field ({format_error(row, text_field)}); pass --text_field (text_field=) "
            "with the name of the field that holds the text, or use one of those formats."
        )
    if data_format == TEXT:
        text = row[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{where}: field {text_field!r} is a {type(text).__name__}, not a string; point --text_field at a "
                "text field."
            )
        return text
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    if tokenizer is None:
        raise ValueError(f"{where} is a conversation: pass the tokenizer (load_samples(..., tokenizer=...)) to render "
                         "it through the chat template.")  # fmt: skip
    if data_format == MESSAGES:
        return render_conversation(tokenizer, _messages(row["messages"], f"{where}: 'messages'"))
    messages = _messages(prompt, f"{where}: 'prompt'") + _messages(completion, f"{where}: 'completion'")
    return render_conversation(tokenizer, messages)


def _jsonl_samples(path: Path, text_field: str, domain_field: str | None, tokenizer) -> Iterator[TextSample]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                message = f"{path} line {line_number} is not valid JSON ({err.msg}); fix or remove it."
                raise ValueError(message) from err
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {line_number} is a {type(row).__name__}, not a JSON object (a row).")
            text = row_text(row, text_field, tokenizer, where=f"{path} line {line_number}")
            domain = row.get(domain_field) if domain_field else None
            yield TextSample(text, path.stem if domain is None else str(domain))


def _txt_samples(path: Path) -> Iterator[TextSample]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            yield TextSample(line.rstrip("\r\n"), path.stem)


def load_samples(
    paths: str | Path | Sequence[str | Path],
    text_field: str = "text",
    domain_field: str | None = "domain",
    max_samples: int | None = None,
    tokenizer=None,
) -> list[TextSample]:
    """Read texts from local `.txt` / `.jsonl` files, skipping empty texts.

    A `.txt` file holds one text per line and its domain is the file name without suffix; a `.jsonl` row (any format
    of `finetune.formats`; conversations need `tokenizer`, whose chat template renders them) takes its domain from
    `domain_field` when present, else from the file name. Several files of one domain each are therefore an easy way
    to get per-domain statistics. At most `max_samples` texts are read, in file order.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("No data file given; pass one or more .txt or .jsonl files.")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}.")
    samples: list[TextSample] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"Data file {path} does not exist; pass an existing .txt or .jsonl file.")
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"Data file {path} has suffix {path.suffix!r}; use a .txt file (one text per line) or a .jsonl file."
            )
        rows = (_txt_samples(path) if path.suffix == ".txt"
                else _jsonl_samples(path, text_field, domain_field, tokenizer))  # fmt: skip
        for sample in rows:
            if sample.text.strip():
                samples.append(sample)
            if max_samples is not None and len(samples) >= max_samples:
                return samples
    if not samples:
        raise ValueError(f"The data ({', '.join(map(str, paths))}) contains no non-empty text; add some text to it.")
    return samples


def tokenize_samples(tokenizer, samples: Sequence[TextSample], max_length: int | None = None) -> list[EncodedSample]:
    """Tokenise every text (special tokens as the tokenizer adds them, e.g. BOS), truncated to `max_length`."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a token and its next-token target), got {max_length}.")
    encoded = []
    for sample in samples:
        ids = tokenizer(sample.text, truncation=max_length is not None, max_length=max_length)["input_ids"]
        if ids:
            encoded.append(EncodedSample(tuple(ids), sample.domain))
    if not encoded:
        raise ValueError("Tokenisation produced no tokens for any text; check the data and the tokenizer.")
    return encoded


def pad_token_id_of(tokenizer) -> int:
    """The id used for padding (never seen by the statistics: padded positions are masked out)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def iter_batches(samples: Sequence[EncodedSample], batch_size: int, pad_token_id: int = 0) -> Iterator[Batch]:
    """Right-padded batches of `batch_size` samples, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(sample.input_ids) for sample in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sample in enumerate(chunk):
            input_ids[row, : len(sample.input_ids)] = torch.tensor(sample.input_ids, dtype=torch.long)
            attention_mask[row, : len(sample.input_ids)] = 1
        yield Batch(input_ids, attention_mask, [sample.domain for sample in chunk])


def num_batches(samples: Sequence[EncodedSample], batch_size: int) -> int:
    return (len(samples) + batch_size - 1) // batch_size
