"""Tests for the DeepSeekMoE tokenizer helpers (tiny byte-level BPE + released chat format)."""

from __future__ import annotations

import json

import pytest

from modeling_deepseekmoe.tokenization import (
    BOS_TOKEN,
    DEEPSEEK_CHAT_TEMPLATE,
    DEFAULT_CORPUS_PATH,
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    build_tokenizer,
    install_chat_template,
)

SYSTEM = "You are a helpful assistant."
USER_1 = "Who are you?"
ASSISTANT_1 = "I am a small test model, 你好!"
USER_2 = "What is 12 + 30?"
ASSISTANT_2 = "12 + 30 = 42."

CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER_1},
    {"role": "assistant", "content": ASSISTANT_1},
    {"role": "user", "content": USER_2},
    {"role": "assistant", "content": ASSISTANT_2},
]


def released_format(messages, add_generation_prompt=False):
    """Independent re-implementation of the released DeepSeekMoE chat format, in plain Python."""
    out = BOS_TOKEN
    for message in messages:
        if message["role"] == "system":
            out += message["content"] + "\n\n"
        elif message["role"] == "user":
            out += "User: " + message["content"] + "\n\n"
        elif message["role"] == "assistant":
            out += "Assistant: " + message["content"] + EOS_TOKEN
    if add_generation_prompt:
        out += "Assistant:"
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def test_special_token_strings():
    assert BOS_TOKEN == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert EOS_TOKEN == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert "\uff5c" in BOS_TOKEN and "|" not in BOS_TOKEN
    assert "\u2581" in EOS_TOKEN and "_" not in EOS_TOKEN


def test_shipped_corpus():
    text = DEFAULT_CORPUS_PATH.read_text(encoding="utf-8")
    size = len(text.encode("utf-8"))
    assert 20_000 <= size <= 60_000
    lines = [line for line in text.splitlines() if line]
    assert 200 <= len(lines) <= 1000
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # some Chinese
    assert any(" = " in line for line in lines)  # arithmetic / code-like lines


def test_vocab_and_special_tokens(tokenizer):
    assert tokenizer.is_fast
    assert len(tokenizer) == 512
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 512
    assert sorted(vocab.values()) == list(range(512))
    # Specials sit after the BPE vocabulary (like ids 100000 / 100001 in the released tokenizer).
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.bos_token_id == 510
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 511
    assert tokenizer.pad_token == EOS_TOKEN and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids(BOS_TOKEN) == 510
    assert set(tokenizer.all_special_tokens) >= {BOS_TOKEN, EOS_TOKEN}
    # All 256 byte-level symbols are present, so any text can be encoded without unknown tokens.
    assert tokenizer.unk_token is None
    # Byte-level decoding must not "clean up" spaces before punctuation.
    assert tokenizer.clean_up_tokenization_spaces is False


def test_encode_prepends_bos(tokenizer):
    ids = tokenizer.encode("Hello world")
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.encode("Hello world", add_special_tokens=False) == ids[1:]
    batch = tokenizer(["a b", "the river"])["input_ids"]
    assert all(row[0] == tokenizer.bos_token_id for row in batch)


def test_special_tokens_in_text_are_single_tokens(tokenizer):
    ids = tokenizer.encode(f"Hi{EOS_TOKEN}", add_special_tokens=False)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == f"Hi{EOS_TOKEN}"


@pytest.mark.parametrize(
    "text",
    [
        "The small river is usually busy during the harvest.",
        "  leading spaces, double  spaces and trailing space ",
        "Tabs\tand\nnew lines\n\n and 'quotes' , punctuation ! ?",
        "def add(a, b):\n    return a + b  # 12 * 34 = 408",
        "今天天气很好，我们一起去公园散步吧。",
        "Mixed 中文 and English: 你好, world! 😀 café naïve",
        "",
    ],
)
def test_decode_encode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == BOS_TOKEN + text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_bpe_learned_merges(tokenizer):
    text = "The small river is usually busy during the harvest."
    ids = tokenizer.encode(text, add_special_tokens=False)
    # A trained BPE compresses corpus-like text well below one token per byte.
    assert len(ids) < 0.7 * len(text.encode("utf-8"))


def test_chat_template_matches_released_format(tokenizer):
    assert tokenizer.chat_template == DEEPSEEK_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    expected = (
        f"{BOS_TOKEN}{SYSTEM}\n\n"
        f"User: {USER_1}\n\n"
        f"Assistant: {ASSISTANT_1}{EOS_TOKEN}"
        f"User: {USER_2}\n\n"
        f"Assistant: {ASSISTANT_2}{EOS_TOKEN}"
    )
    assert rendered == expected
    assert rendered == released_format(CONVERSATION)


def test_chat_template_generation_prompt(tokenizer):
    messages = CONVERSATION[:4]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        f"{BOS_TOKEN}{SYSTEM}\n\nUser: {USER_1}\n\nAssistant: {ASSISTANT_1}{EOS_TOKEN}User: {USER_2}\n\nAssistant:"
    )
    assert rendered.endswith("Assistant:")  # no trailing space
    assert rendered == released_format(messages, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == released_format(messages)
    assert rendered == without + "Assistant:"


def test_chat_template_readme_example(tokenizer):
    messages = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<｜begin▁of▁sentence｜>User: u1\n\nAssistant: a1<｜end▁of▁sentence｜>User: u2\n\nAssistant:"


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(Exception, match="system, user and assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_tokenization_has_single_bos(tokenizer):
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.eos_token_id) == 2
    assert ids[-1] == tokenizer.eos_token_id


def _masked_spans(ids, mask):
    spans, current = [], []
    for token_id, flag in zip(ids, mask, strict=True):
        if flag:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def test_assistant_tokens_mask(tokenizer):
    out = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    assert set(mask) == {0, 1}
    spans = _masked_spans(ids, mask)
    assert [tokenizer.decode(span) for span in spans] == [
        f" {ASSISTANT_1}{EOS_TOKEN}",
        f" {ASSISTANT_2}{EOS_TOKEN}",
    ]
    # Every EOS (end of an assistant turn) is trained; BOS and the "Assistant:" headers are not.
    assert all(flag == 1 for token_id, flag in zip(ids, mask) if token_id == tokenizer.eos_token_id)
    assert mask[0] == 0
    unmasked_text = tokenizer.decode([token_id for token_id, flag in zip(ids, mask) if not flag])
    assert unmasked_text == f"{BOS_TOKEN}{SYSTEM}\n\nUser: {USER_1}\n\nAssistant:User: {USER_2}\n\nAssistant:"
    assert ASSISTANT_1 not in unmasked_text


def test_assistant_tokens_mask_with_generation_prompt(tokenizer):
    out = tokenizer.apply_chat_template(
        CONVERSATION[:4],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=True,
    )
    spans = _masked_spans(out["input_ids"], out["assistant_masks"])
    assert [tokenizer.decode(span) for span in spans] == [f" {ASSISTANT_1}{EOS_TOKEN}"]
    # The trailing generation prompt is not part of any assistant turn.
    assert out["assistant_masks"][-1] == 0


def test_trl_recognises_template(tokenizer):
    chat_template_utils = pytest.importorskip("trl.chat_template_utils")
    assert chat_template_utils.has_generation_markers(tokenizer.chat_template)
    assert chat_template_utils.is_chat_template_stop_token_trained(tokenizer)


def test_save_and_autotokenizer_round_trip(tokenizer, saved_dir):
    from transformers import AutoTokenizer

    assert not (saved_dir / "config.json").exists()
    reloaded = AutoTokenizer.from_pretrained(saved_dir)
    assert reloaded.is_fast
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.bos_token == BOS_TOKEN and reloaded.bos_token_id == tokenizer.bos_token_id
    assert reloaded.eos_token == EOS_TOKEN and reloaded.eos_token_id == tokenizer.eos_token_id
    assert reloaded.pad_token == EOS_TOKEN and reloaded.pad_token_id == tokenizer.eos_token_id
    assert reloaded.chat_template == DEEPSEEK_CHAT_TEMPLATE
    text = "Hello world! 12 + 30 = 42. 你好，世界。"
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.encode(text)[0] == tokenizer.bos_token_id
    assert reloaded.decode(reloaded.encode(text), skip_special_tokens=True) == text
    assert reloaded.apply_chat_template(CONVERSATION, tokenize=False) == released_format(CONVERSATION)
    out = reloaded.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    spans = _masked_spans(out["input_ids"], out["assistant_masks"])
    assert [reloaded.decode(span) for span in spans] == [f" {ASSISTANT_1}{EOS_TOKEN}", f" {ASSISTANT_2}{EOS_TOKEN}"]


def test_build_tokenizer_save_directory(tmp_path):
    from transformers import AutoTokenizer

    target = tmp_path / "tok"
    tokenizer = build_tokenizer(vocab_size=300, save_directory=target)
    assert (target / "tokenizer.json").is_file()
    assert (target / "tokenizer_config.json").is_file()
    config = json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == BOS_TOKEN and config["eos_token"] == EOS_TOKEN
    reloaded = AutoTokenizer.from_pretrained(target)
    assert len(reloaded) == len(tokenizer) == 300
    assert reloaded.encode("abc") == tokenizer.encode("abc")
    assert reloaded.chat_template == DEEPSEEK_CHAT_TEMPLATE


def test_deterministic(tokenizer):
    other = build_tokenizer()
    assert other.get_vocab() == tokenizer.get_vocab()
    assert other.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    text = "A quiet village opens early on market days. 1 + 1 = 2"
    assert other.encode(text) == tokenizer.encode(text)


def test_custom_corpus_and_vocab_size(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("aaaa bbbb aaaa bbbb\n" * 50 + "abab abab\n" * 20, encoding="utf-8")
    small = build_tokenizer(vocab_size=MIN_VOCAB_SIZE, corpus_files=[corpus])
    assert len(small) == MIN_VOCAB_SIZE  # bytes + specials, no merges
    assert small.bos_token_id == MIN_VOCAB_SIZE - 2 and small.eos_token_id == MIN_VOCAB_SIZE - 1
    assert small.decode(small.encode("aaaa xyz 你"), skip_special_tokens=True) == "aaaa xyz 你"
    bigger = build_tokenizer(vocab_size=264, corpus_files=str(corpus))
    assert len(bigger) == 264
    assert len(bigger.encode("aaaa", add_special_tokens=False)) < len(small.encode("aaaa", add_special_tokens=False))
    # A corpus that cannot support the requested merges yields a smaller vocabulary, never a larger one.
    capped = build_tokenizer(vocab_size=5000, corpus_files=[corpus])
    assert MIN_VOCAB_SIZE < len(capped) < 5000
    assert capped.eos_token_id == len(capped) - 1


@pytest.mark.parametrize("vocab_size", [0, 100, 256, MIN_VOCAB_SIZE - 1])
def test_too_small_vocab_raises(vocab_size):
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(vocab_size=vocab_size)


def test_empty_corpus_raises(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer(corpus_files=[corpus])


def test_install_chat_template():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_tokens(list("abc"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    tok.pad_token = None
    tok.chat_template = None
    assert tok.pad_token is None and tok.chat_template is None

    assert install_chat_template(tok) is True
    assert tok.chat_template == DEEPSEEK_CHAT_TEMPLATE
    assert tok.pad_token == EOS_TOKEN
    # Nothing left to do.
    assert install_chat_template(tok) is False
    assert install_chat_template(tok, overwrite=True) is False

    # An existing template is kept unless overwrite=True; an existing pad token is never replaced.
    tok.chat_template = "{{ 'custom' }}"
    tok.pad_token = "a"
    assert install_chat_template(tok) is False
    assert tok.chat_template == "{{ 'custom' }}" and tok.pad_token == "a"
    assert install_chat_template(tok, overwrite=True) is True
    assert tok.chat_template == DEEPSEEK_CHAT_TEMPLATE and tok.pad_token == "a"
