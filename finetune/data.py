"""SFT datasets: loading, format detection, validation and tokenization into `input_ids` + `labels`.

Formats (the ones TRL's `SFTTrainer` knows):
- conversational: a `messages` column of `[{"role": "system"|"user"|"assistant", "content": str}, ...]`
  (ShareGPT-style `conversations` of `{"from", "value"}` are converted);
- prompt-completion: `prompt` and `completion` columns, both strings or both message lists;
- plain text: one text column (`dataset_text_field`, "text" by default).

Everything is checked before training starts, and every problem raises `DatasetValidationError` naming the row
(0-based) and the field: an empty dataset, rows without the expected fields, conversations that do not alternate
user/assistant or end with the user, and rows whose trained tokens would all be truncated away by `max_length`.

The tokenized dataset carries `labels` with the loss mask already applied (-100 = not trained): by default only the
assistant answers and their EOS for conversations (the chat template's `{% generation %}` blocks) and only the
completion for prompt-completion rows. TRL then only truncates, packs and collates it.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from modeling_deepseekmoe.tokenization import DEEPSEEK_CHAT_TEMPLATE, install_chat_template

from .formats import row_format, standardize_dataset


MESSAGES, PROMPT_COMPLETION, TEXT = "messages", "prompt_completion", "text"
FORMATS = ("auto", MESSAGES, PROMPT_COMPLETION, TEXT)
ROLES = ("system", "user", "assistant")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# What a row may be labelled with: -100 is ignored by the loss.
IGNORE_INDEX = -100


class DatasetValidationError(ValueError):
    """The training data cannot be used as given; the message names the row and the field."""


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_sft_dataset(path: str | os.PathLike, split: str = "train") -> Dataset:
    """A local dataset: a JSON / JSONL / Parquet / CSV file, or a folder written by `Dataset.save_to_disk` (for a
    `DatasetDict` folder, `split` picks the split)."""
    path = Path(path)
    if path.is_dir():
        try:
            loaded = load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DatasetValidationError(
                f"{path} is a folder but not one written by `save_to_disk` ({err}); pass a .json/.jsonl/.parquet/.csv "
                "file or a `save_to_disk` folder."
            ) from err
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise DatasetValidationError(f"{path} has the splits {sorted(loaded)}, not {split!r}.")
            loaded = loaded[split]
        return _check_not_empty(loaded, path)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset {path} does not exist.")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DatasetValidationError(
            f"Cannot read {path}: expected one of {sorted(FILE_BUILDERS)} or a `save_to_disk` folder."
        )
    if path.stat().st_size == 0:
        raise DatasetValidationError(f"The dataset {path} is empty (0 rows).")
    try:
        dataset = load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets raises several error types for unparsable files
        if builder in ("json", "csv"):
            locate_text_error(path, builder)
        raise DatasetValidationError(f"Cannot read {path} as {builder}: {_root_cause(err)}") from err
    return _check_not_empty(dataset, path)


def locate_text_error(path: Path, builder: str) -> None:
    """Why a JSON/JSONL/CSV file did not load, as a `DatasetValidationError` naming the line (and row): bytes that
    are not UTF-8, or (JSON) the first line that does not parse; the datasets library names neither. Returns when
    it finds neither."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetValidationError(
            f"{path} line {line}{_row_of_line(data, line, builder)}: byte 0x{data[err.start]:02x} at column {column} "
            "is not UTF-8 text; re-save the file as UTF-8."
        ) from err
    if builder != "json":
        return
    try:
        json.loads(text)
        return  # one JSON document
    except json.JSONDecodeError as document_error:
        lines = text.split("\n")
        first = next(line for line in lines if line.strip())
        if not _parses(first):  # a document spread over lines (a list of rows, pretty-printed): its own position
            raise DatasetValidationError(
                f"{path} line {document_error.lineno} is not valid JSON ({document_error.msg} at column "
                f"{document_error.colno}); fix the file."
            ) from document_error
    for number, line in enumerate(lines, start=1):  # JSON Lines: the first row that does not parse
        if line.strip() and not _parses(line):
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetValidationError(
                    f"{path} line {number}{_row_of_line(data, number, builder)} is not valid JSON ({err.msg} at "
                    f"column {err.colno}); fix or remove that line."
                ) from err


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _row_of_line(data: bytes, line: int, builder: str) -> str:
    """" (row N)" for a 1-based line: the 0-based row, as errors about rows count them (JSON Lines skip blank lines,
    CSV its header); empty for a CSV row with quoted line breaks, where lines and rows differ."""
    before = data.split(b"\n")[: line - 1]
    if builder == "csv":
        return " (the header)" if line == 1 else "" if b'"' in data else f" (row {line - 2})"
    return f" (row {sum(1 for text in before if text.strip())})"


def _root_cause(err: BaseException) -> str:
    """The innermost message of an error chain, on one line ("An error occurred while generating the dataset" says
    nothing; its cause names the problem)."""
    messages = []
    while err is not None and len(messages) < 10:
        if str(err).strip():
            messages.append(" ".join(str(err).split()))
        err = err.__cause__ or err.__context__
    return messages[-1] if messages else "unknown error"


def _check_not_empty(dataset: Dataset, source) -> Dataset:
    if len(dataset) == 0:
        raise DatasetValidationError(f"The dataset {source} is empty (0 rows).")
    return dataset


# --------------------------------------------------------------------------------------------------------------------
# Formats and row validation


def detect_format(column_names: list[str], text_field: str = "text") -> str:
    """The format the columns describe (conversational first, as TRL does)."""
    columns = set(column_names)
    if "messages" in columns or "conversations" in columns:
        return MESSAGES
    if {"prompt", "completion"} <= columns:
        return PROMPT_COMPLETION
    if text_field in columns:
        return TEXT
    raise DatasetValidationError(
        f"The dataset has the columns {sorted(columns)}, none of the supported formats: a 'messages' column "
        "(conversational), 'prompt' + 'completion' columns, or a text column (--dataset_text_field, now "
        f"{text_field!r})."
    )


def _required_columns(data_format: str, text_field: str) -> tuple[str, ...]:
    return {MESSAGES: ("messages",), PROMPT_COMPLETION: ("prompt", "completion"), TEXT: (text_field,)}[data_format]


def normalize_dataset(
    dataset: Dataset, data_format: str = "auto", text_field: str = "text", source=None
) -> tuple[Dataset, str]:
    """Check the columns for `data_format` ("auto" detects it), convert ShareGPT `conversations` and JSON-encoded
    message lists (as CSV stores them) to `messages`, and validate every row. Returns (dataset, format). `source`
    (the file) is named in errors about undecodable rows."""
    if data_format not in FORMATS:
        raise DatasetValidationError(f"dataset_format must be one of {FORMATS}, got {data_format!r}.")
    if len(dataset) == 0:
        raise DatasetValidationError("The dataset is empty (0 rows).")
    dataset = standardize_dataset(dataset)  # ShareGPT `conversations`, Alpaca `instruction`/`input`/`output`
    if data_format == "auto":
        data_format = detect_format(dataset.column_names, text_field)
    missing = [c for c in _required_columns(data_format, text_field) if c not in dataset.column_names]
    if missing:
        raise DatasetValidationError(
            f"The dataset has no {', '.join(repr(c) for c in missing)} column(s) for the {data_format} format "
            f"(columns: {sorted(dataset.column_names)})."
        )
    dataset = dataset.select_columns(list(_required_columns(data_format, text_field)))
    rows = [_validated_row(_read_row(dataset, i, source), i, data_format, text_field) for i in range(len(dataset))]
    return Dataset.from_list(rows), data_format


def _read_row(dataset: Dataset, index: int, source) -> dict:
    """A row; Arrow loads bytes that are not UTF-8 into text columns and fails only when the row is read."""
    try:
        return dataset[index]
    except UnicodeDecodeError as err:
        where = f"{source} row {index}" if source else f"Row {index}"
        raise DatasetValidationError(
            f"{where}: holds bytes that are not UTF-8 text ({err.reason}: byte 0x{err.object[err.start]:02x}); "
            "re-save the file as UTF-8."
        ) from err


def _validated_row(row: dict, index: int, data_format: str, text_field: str) -> dict:
    if data_format == TEXT:
        text = row[text_field]
        if not isinstance(text, str) or not text.strip():
            raise DatasetValidationError(f"Row {index}: field {text_field!r} is {_describe(text)}, expected text.")
        return {text_field: text}
    if data_format == MESSAGES:
        messages = _decode_messages(row["messages"], index, "messages")
        check_conversation(messages, index)
        check_answers(messages, index)
        return {"messages": messages}
    prompt, completion = row["prompt"], row["completion"]
    plain = [name for name, value in (("prompt", prompt), ("completion", completion)) if _is_plain_text(value)]
    if len(plain) == 2:
        if not completion.strip():
            raise DatasetValidationError(f"Row {index}: field 'completion' is empty; there is nothing to train on.")
        return {"prompt": prompt, "completion": completion}
    if len(plain) == 1:
        other = "completion" if plain == ["prompt"] else "prompt"
        raise DatasetValidationError(
            f"Row {index}: field {other!r} is {_describe(row[other])} while {plain[0]!r} is text; both must be "
            "strings, or both lists of {'role', 'content'} messages."
        )
    prompt = _decode_messages(prompt, index, "prompt")
    completion = _decode_messages(completion, index, "completion")
    check_conversation(prompt, index, field="prompt", expect_last="user")
    roles = [m["role"] for m in completion]
    if roles != ["assistant"]:
        raise DatasetValidationError(f"Row {index}: field 'completion' must be one assistant message, got {roles}.")
    check_answers(completion, index, "completion")
    return {"prompt": prompt, "completion": completion}


def _is_plain_text(value) -> bool:
    """A string that is not a JSON-encoded message list (as CSV stores those)."""
    return isinstance(value, str) and not value.lstrip().startswith("[")


def check_answers(messages: list[dict], index: int, field: str = "messages") -> None:
    """Every assistant turn has text: an empty answer trains the model to answer with nothing (as an empty
    completion would)."""
    for turn, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DatasetValidationError(
                f"Row {index}: {field}[{turn}] is an assistant turn with empty content; there is nothing to train "
                "on. Remove the row or write the answer."
            )


def _describe(value) -> str:
    if value is None:
        return "missing (null)"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _decode_messages(value, index: int, field: str) -> list[dict]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DatasetValidationError(f"Row {index}: field {field!r} is not valid JSON: {err}") from err
    if not isinstance(value, list) or not value:
        raise DatasetValidationError(
            f"Row {index}: field {field!r} is {_describe(value) if not isinstance(value, list) else 'an empty list'}, "
            "expected a list of {'role', 'content'} messages."
        )
    messages = []
    for turn, message in enumerate(value):
        where = f"Row {index}: {field}[{turn}]"
        if not isinstance(message, dict):
            raise DatasetValidationError(f"{where} is {_describe(message)}, expected a {{'role', 'content'}} dict.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DatasetValidationError(f"{where}.role is {role!r}; the DeepSeek chat format knows {list(ROLES)}.")
        if not isinstance(content, str):
            raise DatasetValidationError(f"{where}.content is {_describe(content)}, expected a string.")
        messages.append({"role": role, "content": content})
    return messages


def check_conversation(messages: list[dict], index: int, field: str = "messages", expect_last: str = "assistant"):
    """An optional system message first, then user and assistant turns alternating, starting with the user and ending
    with `expect_last`."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise DatasetValidationError(f"Row {index}: {field} has no user or assistant turn.")
    for turn, message in enumerate(turns):
        position = turn + (len(messages) - len(turns))
        expected = "user" if turn % 2 == 0 else "assistant"
        if message["role"] != expected:
            detail = "turns must alternate"
            if message["role"] == "system":
                detail = "a system message is only allowed first"
            raise DatasetValidationError(
                f"Row {index}: {field}[{position}].role is {message['role']!r} where {expected!r} was expected "
                f"({detail}: user, assistant, user, ...)."
            )
    if turns[-1]["role"] != expect_last:
        raise DatasetValidationError(
            f"Row {index}: {field} ends with a {turns[-1]['role']} turn ({field}[{len(messages) - 1}]); it must end "
            f"with {'an' if expect_last == 'assistant' else 'a'} {expect_last} turn"
            + (" (the answer the model is trained on)." if expect_last == "assistant" else ".")
        )


# --------------------------------------------------------------------------------------------------------------------
# Chat template and tokenization


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


_PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]


def ensure_training_chat_template(tokenizer, assistant_only_loss: bool = True) -> None:
    """Install the DeepSeek chat template when the tokenizer has none (and pad = EOS). For assistant-only loss the
    template needs `{% generation %}` markers: a template without them that renders the DeepSeek format (e.g. the
    released chat tokenizer's) is replaced by the project's marked copy; any other is an error."""
    install_chat_template(tokenizer)
    if not assistant_only_loss or has_generation_markers(tokenizer.chat_template):
        return
    try:
        same = tokenizer.apply_chat_template(_PROBE, tokenize=False) == tokenizer.apply_chat_template(
            _PROBE, tokenize=False, chat_template=DEEPSEEK_CHAT_TEMPLATE
        )
    except Exception:  # a template may reject the probe's system message
        same = False
    if not same:
        raise DatasetValidationError(
            "assistant_only_loss needs a chat template with {% generation %} ... {% endgeneration %} around the "
            "assistant answers, and the tokenizer's template has none and is not the DeepSeek format. Add the markers "
            "(--chat_template_path template.jinja) or pass --assistant_only_loss false."
        )
    tokenizer.chat_template = DEEPSEEK_CHAT_TEMPLATE


@dataclass
class TokenizeOptions:
    assistant_only_loss: bool = True
    completion_only_loss: bool | None = None  # None: True for prompt-completion rows
    text_field: str = "text"


def tokenize_row(row: dict, tokenizer, data_format: str, options: TokenizeOptions) -> dict:
    """`input_ids` and `labels` (-100 where not trained) of one validated row."""
    if data_format == MESSAGES:
        encoded = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=options.assistant_only_loss
        )
        input_ids = list(encoded["input_ids"])
        if not options.assistant_only_loss:
            return {"input_ids": input_ids, "labels": list(input_ids)}
        mask = encoded["assistant_masks"]
        return {"input_ids": input_ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask)]}
    if data_format == TEXT:
        text = row[options.text_field]
        if not text.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token
        input_ids = tokenizer(text)["input_ids"]
        return {"input_ids": input_ids, "labels": list(input_ids)}
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        if not completion.endswith(tokenizer.eos_token):
            completion += tokenizer.eos_token
        prompt_ids = tokenizer(prompt)["input_ids"]
        input_ids = tokenizer(prompt + completion)["input_ids"]
    else:
        prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        prompt_ids = prompt_ids["input_ids"]
        input_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    input_ids = list(input_ids)
    if options.completion_only_loss is False:
        return {"input_ids": input_ids, "labels": list(input_ids)}
    # The completion starts where the two tokenizations diverge (tokens can merge across the boundary).
    start = 0
    while start < min(len(prompt_ids), len(input_ids)) and prompt_ids[start] == input_ids[start]:
        start += 1
    return {"input_ids": input_ids, "labels": [IGNORE_INDEX] * start + input_ids[start:]}


def tokenize_dataset(dataset: Dataset, tokenizer, data_format: str, options: TokenizeOptions, num_proc=None):
    return dataset.map(
        tokenize_row,
        fn_kwargs={"tokenizer": tokenizer, "data_format": data_format, "options": options},
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="Tokenizing",
    )


# --------------------------------------------------------------------------------------------------------------------
# Truncation


def kept_window(length: int, max_length: int | None, truncation_mode: str = "keep_start") -> slice:
    if max_length is None or length <= max_length:
        return slice(0, length)
    return slice(0, max_length) if truncation_mode == "keep_start" else slice(length - max_length, length)


def check_truncation(
    dataset: Dataset,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    packing_strategy: str | None = None,
    drop_truncated_rows: bool = False,
) -> Dataset:
    """Rows must keep at least one trained token after truncation (the first token of a sequence is never a target).
    Packing with "bfd_split" / "wrapped" keeps every token; "bfd" and no packing cut each row to `max_length`."""
    if packing_strategy in ("bfd_split", "wrapped"):
        max_length = None
    empty = []
    for index, labels in enumerate(dataset["labels"]):
        window = labels[kept_window(len(labels), max_length, truncation_mode)]
        if not any(label != IGNORE_INDEX for label in window[1:]):
            empty.append(index)
    if not empty:
        return dataset
    shown = ", ".join(f"row {row} (first trained token at position {_first_trained(dataset[row]['labels'])})"
                      for row in empty[:3])  # fmt: skip
    reason = f"max_length={max_length} ({truncation_mode})" if max_length else "tokenization"
    message = (
        f"{len(empty)} of {len(dataset)} rows have no trained token left after {reason}: {shown}"
        f"{' and more' if len(empty) > 3 else ''}."
    )
    if len(empty) == len(dataset):
        raise DatasetValidationError(f"Every row is truncated away. {message} Raise --max_length or shorten the rows.")
    if not drop_truncated_rows:
        raise DatasetValidationError(
            f"{message} Raise --max_length, shorten those rows, or pass --drop_truncated_rows to leave them out."
        )
    keep = sorted(set(range(len(dataset))) - set(empty))
    return dataset.select(keep)


def _first_trained(labels: list[int]) -> int | None:
    return next((position for position, label in enumerate(labels) if label != IGNORE_INDEX), None)


# --------------------------------------------------------------------------------------------------------------------
# All together


def prepare_sft_dataset(
    dataset: Dataset | str | os.PathLike,
    tokenizer,
    *,
    data_format: str = "auto",
    split: str = "train",
    text_field: str = "text",
    assistant_only_loss: bool = True,
    completion_only_loss: bool | None = None,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    packing: bool = False,
    packing_strategy: str = "bfd",
    drop_truncated_rows: bool = False,
    num_proc: int | None = None,
) -> Dataset:
    """Load (a path) or take (a `Dataset`), validate and tokenize: a dataset of `input_ids` and `labels` ready for
    `SFTTrainer`, or a `DatasetValidationError` naming the row and field."""
    source = None
    if not isinstance(dataset, Dataset):
        source = dataset
        dataset = load_sft_dataset(dataset, split)
    dataset, data_format = normalize_dataset(dataset, data_format, text_field, source)
    if data_format == MESSAGES or (data_format == PROMPT_COMPLETION and not isinstance(dataset[0]["prompt"], str)):
        ensure_training_chat_template(tokenizer, assistant_only_loss and data_format == MESSAGES)
    options = TokenizeOptions(assistant_only_loss, completion_only_loss, text_field)
    tokenized = tokenize_dataset(dataset, tokenizer, data_format, options, num_proc)
    return check_truncation(
        tokenized, max_length, truncation_mode, packing_strategy if packing else None, drop_truncated_rows
    )
