"""Chatting with and generating from a DeepSeekMoE (base, merged, or with a LoRA / ESFT adapter; any precision):
what `deepseekmoe chat` and `deepseekmoe generate` run.

    model, tokenizer = load_for_inference("base", adapter="runs/lora", load_in_4bit=True)
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=64)
"""

import json
import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from modeling_deepseekmoe.tokenization import install_chat_template

from deepseekmoe.finetune.adapters import load_model, load_tokenizer


def load_for_inference(model_name_or_path, adapter=None, dtype="auto", load_in_4bit: bool = False, device_map=None,
                       **options):  # fmt: skip
    """(model in eval mode, tokenizer): loaded by `finetune.adapters.load_model` (`options`: the other quantization
    flags, `load_in_8bit`, `attn_implementation`, ...), the chat template installed when the tokenizer has none, and
    the generation defaults (pad = EOS, no ids past the tokenizer)."""
    model = load_model(model_name_or_path, adapter, dtype=dtype, load_in_4bit=load_in_4bit, device_map=device_map,
                       **options)  # fmt: skip
    tokenizer = load_tokenizer(model_name_or_path, adapter)
    install_chat_template(tokenizer)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.apply_generation_defaults(len(tokenizer))
    return model.eval(), tokenizer


class _FileStreamer(TextStreamer):
    def __init__(self, tokenizer, file):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.file = file

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="\n" if stream_end else "", file=self.file, flush=True)


def chat_input_ids(tokenizer, messages: list[dict], device) -> torch.Tensor:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"].to(device)


def generate_reply(model, tokenizer, messages: list[dict], stream=None, **generation_kwargs) -> str:
    """The assistant's reply to `messages` (chat format), streamed to `stream` (a file) token by token if given."""
    input_ids = chat_input_ids(tokenizer, messages, model.device)
    streamer = _FileStreamer(tokenizer, stream) if stream is not None else None
    output = model.generate(input_ids, streamer=streamer, **generation_kwargs)
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def generate_text(model, tokenizer, prompt: str, **generation_kwargs) -> str:
    """Plain completion of `prompt` (no chat template)."""
    encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(**encoded, **generation_kwargs)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def chat_loop(model, tokenizer, system: str | None = None, input_stream=sys.stdin, output=sys.stdout, **kwargs):
    """Interactive chat: one user turn per line, replies streamed; an empty line or EOF ends it."""
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        print("User: ", end="", file=output, flush=True)
        line = input_stream.readline()
        if not line or not line.strip():
            return messages
        messages.append({"role": "user", "content": line.rstrip("\n")})
        print("Assistant: ", end="", file=output, flush=True)
        reply = generate_reply(model, tokenizer, messages, stream=output, **kwargs)
        messages.append({"role": "assistant", "content": reply})


def load_messages(path: str) -> list[dict]:
    messages = json.loads(Path(path).read_text())
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"{path} must hold a JSON list of {{'role', 'content'}} messages.")
    return messages
