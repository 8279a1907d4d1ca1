"""Tokenizer helpers for DeepSeekMoE.

The released DeepSeekMoE 16B checkpoints ship a byte-level BPE tokenizer (built with the Hugging Face
``tokenizers`` library) whose special tokens are ``<｜begin▁of▁sentence｜>`` (BOS) and
``<｜end▁of▁sentence｜>`` (EOS).  The bar is the fullwidth ``U+FF5C`` and the "▁" is ``U+2581``.  BOS is
prepended to every encoded sequence by default and the released README uses EOS as padding token.

This module provides

* the special token strings and the chat template of the released chat model (:data:`BOS_TOKEN`,
  :data:`EOS_TOKEN`, :data:`DEEPSEEK_CHAT_TEMPLATE`), written with ``{% generation %}`` markers so that
  ``return_assistant_tokens_mask=True`` (and TRL's ``assistant_only_loss=True``) trains on the assistant answer
  *and* its EOS while keeping the ``"Assistant:"`` header masked;
* :func:`install_chat_template` to attach that template (and pad = EOS) to any tokenizer;
* :func:`build_tokenizer` to train a tiny, deterministic byte-level BPE tokenizer with the same special tokens,
  BOS behaviour and chat format.  It is meant for tests, demos and randomly initialised toy models; real
  checkpoints come with their own tokenizer files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "DEEPSEEK_CHAT_TEMPLATE",
    "DEFAULT_CORPUS_PATH",
    "MIN_VOCAB_SIZE",
    "install_chat_template",
    "build_tokenizer",
]

BOS_TOKEN = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
"""``<｜begin▁of▁sentence｜>`` -- id 100000 in the released tokenizer."""

EOS_TOKEN = "<\uff5cend\u2581of\u2581sentence\uff5c>"
"""``<｜end▁of▁sentence｜>`` -- id 100001 in the released tokenizer."""

SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)

# 256 byte-level symbols + the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

DEFAULT_CORPUS_PATH = Path(__file__).resolve().parent / "data" / "tokenizer_corpus.txt"
"""Small plain-text corpus shipped with the package (English prose, arithmetic, code-like lines, some Chinese)."""

# Matches the context length of the released DeepSeekMoE 16B models.
DEFAULT_MODEL_MAX_LENGTH = 4096

# Chat format of the released DeepSeekMoE chat model:
#   bos_token
#   system:    content + "\n\n"
#   user:      "User: " + content + "\n\n"
#   assistant: "Assistant: " + content + eos_token
#   generation prompt: "Assistant:" (no trailing space)
# The assistant turn is split into the header "Assistant:" (outside the generation block, i.e. not trained) and
# " " + content + eos_token (inside, i.e. trained), which renders the exact same string as the released template.
# The template is kept on a single logical line built from fragments so that no stray whitespace leaks into the
# rendered text.  Roles other than system/user/assistant are rejected instead of being silently dropped.
DEEPSEEK_CHAT_TEMPLATE = (
    "{% if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant:' }}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ raise_exception('DeepSeekMoE chat template only supports the system, user and assistant roles, got: '"
    " + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def install_chat_template(tokenizer, overwrite: bool = False) -> bool:
    """Attach the DeepSeekMoE chat template to ``tokenizer`` and make sure it has a pad token.

    The template is set when the tokenizer has no chat template yet, or when ``overwrite`` is true.  Independently,
    when the tokenizer has no pad token but has an EOS token, EOS is used as pad token (as the released README
    does).

    Returns:
        ``True`` if the tokenizer was modified, ``False`` otherwise.
    """
    changed = False
    current = getattr(tokenizer, "chat_template", None)
    if (current is None or overwrite) and current != DEEPSEEK_CHAT_TEMPLATE:
        tokenizer.chat_template = DEEPSEEK_CHAT_TEMPLATE
        changed = True
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
        changed = True
    return changed


def _read_corpus_lines(corpus_files: Iterable[str | os.PathLike]) -> list[str]:
    lines: list[str] = []
    for path in corpus_files:
        with open(path, encoding="utf-8") as handle:
            lines.extend(line.rstrip("\r\n") for line in handle)
    return [line for line in lines if line]


def build_tokenizer(
    vocab_size: int = 512,
    corpus_files: Iterable[str | os.PathLike] | str | os.PathLike | None = None,
    save_directory: str | os.PathLike | None = None,
):
    """Train a small byte-level BPE tokenizer that behaves like the released DeepSeekMoE tokenizer.

    The tokenizer uses byte-level pre-tokenization/decoding (so any UTF-8 text round-trips through
    ``decode(encode(text))``), prepends BOS when encoding (``add_bos_token=True``), uses EOS as pad token and carries
    :data:`DEEPSEEK_CHAT_TEMPLATE`.  As in the released tokenizer the special tokens come after the BPE vocabulary
    (BOS at id ``len(tokenizer) - 2``, EOS at ``len(tokenizer) - 1``).  Training is deterministic: the same corpus
    and ``vocab_size`` always give the same vocabulary and ids.

    Args:
        vocab_size: Total vocabulary size including the two special tokens.  Must be at least
            :data:`MIN_VOCAB_SIZE` (256 byte symbols + 2 specials).  If the corpus does not support that many merges
            the vocabulary ends up smaller; ``len(tokenizer)`` is never larger than ``vocab_size``.
        corpus_files: Text file(s) to train on.  Defaults to the corpus shipped with the package
            (:data:`DEFAULT_CORPUS_PATH`).
        save_directory: When given, the tokenizer is saved there with ``save_pretrained`` (loadable with
            ``AutoTokenizer.from_pretrained(save_directory)``).

    Returns:
        A ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE tokenizer: it needs at least "
            f"{MIN_VOCAB_SIZE} entries (256 byte symbols + {len(SPECIAL_TOKENS)} special tokens)."
        )

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus_files is None:
        corpus_files = [DEFAULT_CORPUS_PATH]
    elif isinstance(corpus_files, (str, os.PathLike)):
        corpus_files = [corpus_files]
    lines = _read_corpus_lines(corpus_files)
    if not lines:
        raise ValueError("The tokenizer corpus is empty.")

    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer=trainer, length=len(lines))
    # Specials go after the BPE vocabulary, like ids 100000/100001 in the released tokenizer.
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False) for token in SPECIAL_TOKENS]
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=DEFAULT_MODEL_MAX_LENGTH,
        padding_side="right",
    )
    install_chat_template(tokenizer, overwrite=True)

    if save_directory is not None:
        tokenizer.save_pretrained(save_directory)
    return tokenizer
