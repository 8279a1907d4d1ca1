"""The row formats every data-reading command accepts (`sft`, `esft`, `analyze`), and the one normaliser that turns
the common dataset layouts into them.

Formats (TRL's names):
- conversational: `messages`, a list of `{"role": "system"|"user"|"assistant", "content": str}`;
- prompt-completion: `prompt` and `completion`, both strings or both message lists;
- plain text: one text field (`text` by default).

Accepted and converted to `messages` by `standardize_row`:
- ShareGPT: `conversations`, a list of `{"from": "human"|"gpt"|"system", "value": str}`;
- Alpaca: `instruction`, optional `input` (appended to the instruction after a blank line) and `output`, plus an
  optional `system`.
"""

MESSAGES, PROMPT_COMPLETION, TEXT = "messages", "prompt_completion", "text"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ALPACA_FIELDS = ("instruction", "output")


def is_sharegpt(fields) -> bool:
    return "conversations" in fields and "messages" not in fields


def is_alpaca(fields) -> bool:
    return all(name in fields for name in ALPACA_FIELDS) and "messages" not in fields


def sharegpt_messages(conversations) -> list[dict]:
    """ShareGPT turns as messages (roles human/gpt/system mapped; other roles kept for validation to name)."""
    turns = conversations or []
    return [{"role": SHAREGPT_ROLES.get(turn.get("from"), turn.get("from")), "content": turn.get("value")}
            for turn in turns]  # fmt: skip


def alpaca_messages(row: dict) -> list[dict]:
    """An Alpaca row as one user turn (instruction, then the input after a blank line) and the assistant's output."""
    instruction, extra = row.get("instruction"), row.get("input")
    user = instruction if not extra else f"{instruction}\n\n{extra}"
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": row.get("output")}]


def standardize_row(row: dict) -> dict:
    """`{"messages": [...]}` for a ShareGPT or Alpaca row; any other row unchanged."""
    if is_sharegpt(row):
        return {"messages": sharegpt_messages(row["conversations"])}
    if is_alpaca(row):
        return {"messages": alpaca_messages(row)}
    return row


def standardize_dataset(dataset):
    """A `datasets.Dataset` with ShareGPT / Alpaca columns converted to a `messages` column (others unchanged)."""
    columns = dataset.column_names
    if not (is_sharegpt(columns) or is_alpaca(columns)):
        return dataset
    return dataset.map(standardize_row, remove_columns=columns, desc="Converting to messages")


def row_format(fields, text_field: str = "text") -> str | None:
    """The format the fields (column names, or a row's keys) describe, conversational first as TRL does; None if
    none."""
    fields = set(fields)
    if "messages" in fields or is_sharegpt(fields) or is_alpaca(fields):
        return MESSAGES
    if {"prompt", "completion"} <= fields:
        return PROMPT_COMPLETION
    if text_field in fields:
        return TEXT
    return None


def format_error(fields, text_field: str = "text") -> str:
    """What to say when `row_format` finds none."""
    return (
        f"found the fields {sorted(fields)}, none of the supported formats: 'messages' (conversational), ShareGPT "
        "'conversations', Alpaca 'instruction' + 'output' (+ 'input'), 'prompt' + 'completion', or a text field "
        f"(now {text_field!r})"
    )
