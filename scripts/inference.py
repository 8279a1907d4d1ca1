"""Loading a DeepSeekMoE for inference (base, merged, LoRA adapter or ESFT adapter; bf16 or 4-bit) and generating
through the chat template with streamed tokens."""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import modeling_deepseekmoe  # noqa: F401  (registers the model type)
from modeling_deepseekmoe.tokenization import install_chat_template


DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def adapter_kind(path: str | Path) -> str | None:
    """"lora", "esft" or None (a full checkpoint)."""
    path = Path(path)
    if (path / "esft_adapter.json").is_file():
        return "esft"
    if (path / "adapter_config.json").is_file():
        return "lora"
    return None


def load_for_inference(
    model_path: str,
    adapter_path: str | None = None,
    dtype: str = "auto",
    load_in_4bit: bool = False,
    device_map: str | None = None,
):
    """(model, tokenizer): the checkpoint, with a LoRA or ESFT adapter applied when given, the chat template installed
    when the tokenizer has none, and the generation defaults (pad = EOS, no ids past the tokenizer)."""
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    if not Path(model_path).exists():
        raise FileNotFoundError(f"No checkpoint at {model_path}.")
    kwargs = {"dtype": DTYPES[dtype], "device_map": device_map}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    tokenizer_source = adapter_path if adapter_path and (Path(adapter_path) / "tokenizer.json").is_file() else model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if adapter_path:
        kind = adapter_kind(adapter_path)
        if kind == "lora":
            from deepseekmoe.finetune.lora import load_lora_adapter

            model = load_lora_adapter(model, adapter_path)
        elif kind == "esft":
            from deepseekmoe.finetune.esft.adapter import apply_esft_adapter

            model = apply_esft_adapter(model, adapter_path)
        else:
            raise ValueError(f"{adapter_path} is neither a LoRA adapter (adapter_config.json) nor an ESFT adapter "
                             "(esft_adapter.json).")
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
