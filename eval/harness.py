"""DeepSeekMoE in lm-evaluation-harness: the ``deepseekmoe`` lm-eval model and :func:`evaluate`.

Importing this module registers the model with lm-eval (``--model deepseekmoe``) and the ``deepseek`` model type with
transformers. The model is lm-eval's HF model (``HFLM``) loading through the project's one loader
(``deepseekmoe.finetune.adapters.load_model``):

- ``pretrained``: a checkpoint directory (released layout or ``save_pretrained`` output) or hub id;
- ``adapter``: a LoRA (PEFT, routed-expert LoRA included) or ESFT adapter directory, recognised by its files
  (``peft=`` and ``esft=`` are the same argument under lm-eval's and the old names; give one);
- ``dtype``, ``device``, ``device_map`` (e.g. ``auto`` to spread over GPUs), ``batch_size`` (an int, ``auto``,
  ``auto:N``);
- ``load_in_4bit`` / ``load_in_8bit`` and ``bnb_4bit_quant_type``, ``use_bnb_nested_quant``,
  ``bnb_4bit_compute_dtype``, ``bnb_4bit_quant_storage``: bitsandbytes as everywhere in the project (nf4 + double
  quant, bf16 compute where supported); lm-eval would hand the flags to ``from_pretrained``, which transformers 5
  rejects.

Loglikelihood texts (``loglikelihood_rolling``: perplexity, bits per byte) are scored after one BOS token; lm-eval's
HF model puts two there with a tokenizer that adds BOS itself, as DeepSeek's does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype

import modeling_deepseekmoe  # noqa: F401  (registers the "deepseek" model type with the Auto classes)
from modeling_deepseekmoe.loading import QuantizationArguments

from . import report, suite

MODEL_NAME = "deepseekmoe"

# HFLM loading options that only make sense for other kinds of checkpoints.
_UNSUPPORTED_LOADING = ("delta", "autogptq", "gptqmodel", "gguf_file", "tp_plan")
# HFLM arguments for its own multi-GPU placement, which `device_map` replaces here.
_PLACEMENT_ARGS = ("parallelize", "gpus", "max_memory_per_gpu", "max_cpu_memory", "offload_folder")


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (lm-eval's HF model defaults to ``cuda`` either way)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@register_model(MODEL_NAME)
class DeepseekMoELM(HFLM):
    """lm-eval's HF causal LM for DeepSeekMoE checkpoints, with LoRA/ESFT adapters and bitsandbytes 4/8-bit."""

    def __init__(
        self,
        pretrained,
        adapter: str | None = None,
        peft: str | None = None,
        esft: str | None = None,
        device_map: str | dict | None = None,
        device: str | None = None,
        backend: str = "causal",
        **kwargs,
    ) -> None:
        given = {name: value for name, value in (("adapter", adapter), ("peft", peft), ("esft", esft)) if value}
        if len(given) > 1:
            raise ValueError(
                "Pass either a LoRA adapter (peft=...) or an ESFT adapter (esft=...), or adapter=DIR for either; got "
                f"{' and '.join(f'{name}=' for name in given)}."
            )
        self.adapter = next(iter(given.values()), None)
        if self.adapter and kwargs.get("tokenizer") is None:
            from deepseekmoe.finetune.adapters import tokenizer_source

            kwargs["tokenizer"] = tokenizer_source(pretrained, self.adapter)  # an SFT adapter's chat template
        flags = {f.name for f in fields(QuantizationArguments)}
        self._quantization = QuantizationArguments.from_dict(
            {name: _as_bool(value) if name.startswith("load_in") or name == "use_bnb_nested_quant" else value
             for name, value in kwargs.items() if name in flags}
        )  # fmt: skip
        kwargs = {name: value for name, value in kwargs.items() if name not in flags}
        self._device_map = device_map
        self._bos_added_by_prefix = False
        if device_map is not None:
            kwargs["parallelize"] = True  # placement is the device map's; HFLM must not move the model afterwards
        device = device or default_device()
        super().__init__(pretrained=pretrained, device=device, backend=backend, **kwargs)

    # ------------------------------------------------------------------ loading
    def _create_model(self, pretrained: str, revision="main", dtype="auto", trust_remote_code=False, peft=None,
                      quantization_config=None, subfolder="", **kwargs) -> None:  # fmt: skip
        """Load the checkpoint (quantized if asked) with the adapter, then apply the generation defaults."""
        from deepseekmoe.finetune.adapters import load_model

        _reject_unsupported(kwargs)
        load_kwargs = {key: value for key, value in kwargs.items() if key not in _PLACEMENT_ARGS}
        if not self._quantization.quantization:
            load_kwargs["quantization_config"] = quantization_config  # a checkpoint saved quantized
        model = load_model(
            pretrained,
            self.adapter,
            revision=revision,
            subfolder=subfolder,
            dtype=get_dtype(dtype),
            trust_remote_code=trust_remote_code,
            quantization=self._quantization,
            device_map=self._device_map if self._device_map is not None else {"": str(self.device)},
            **load_kwargs,
        )
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "apply_generation_defaults"):
            base.apply_generation_defaults(tokenizer_size=len(self.tokenizer))
        self._model = model.eval()
        if self._device_map is not None:
            self._device = model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ scoring
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """As lm-eval's, but the text is encoded without the tokenizer's BOS: the rolling windows already start
        with one (lm-eval's prefix token), so each text is scored as BOS + text, not BOS + BOS + text."""
        self._bos_added_by_prefix = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._bos_added_by_prefix = False

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        if self._bos_added_by_prefix and add_special_tokens is None:
            add_special_tokens = False
        return super().tok_encode(
            string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len, **kwargs
        )

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        if self.adapter:
            info["adapter"] = str(self.adapter)
        return info


def _as_bool(value) -> bool:
    """lm-eval's argument strings give ``True``/``False`` as bools already; accept ``"true"``/``"1"`` too."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _reject_unsupported(kwargs: dict) -> None:
    for name in _UNSUPPORTED_LOADING:
        if kwargs.pop(name, None):
            raise ValueError(f"The {MODEL_NAME} model does not support {name}=...; use lm-eval's `hf` model for it.")


# ---------------------------------------------------------------------- library API
@dataclass
class Evaluation:
    """What :func:`evaluate` produced."""

    results: dict  # lm-eval's results (the JSON it writes), without the per-sample logs
    markdown: str  # the results table with the paper's numbers beside ours
    samples: dict | None = None  # per-task sample logs when log_samples=True
    results_file: Path | None = None  # lm-eval's results JSON, when output_path was given
    markdown_file: Path | None = None  # the table next to it
    model_card: Path | None = None  # the README.md the table was written into, when model_card=True


def model_args(pretrained, *, adapter=None, peft=None, esft=None, dtype="auto", load_in_4bit=False,
               device_map=None, **more) -> dict:  # fmt: skip
    """The ``model_args`` of the ``deepseekmoe`` lm-eval model (None values left out)."""
    args = {"pretrained": str(pretrained), "adapter": adapter, "peft": peft, "esft": esft, "dtype": dtype,
            "device_map": device_map}  # fmt: skip
    args = {key: str(value) if isinstance(value, os.PathLike) else value for key, value in args.items()}
    if load_in_4bit:
        args["load_in_4bit"] = True
    args.update(more)
    return {key: value for key, value in args.items() if value is not None}


def evaluate(
    pretrained: str | os.PathLike,
    tasks: str | list,
    *,
    adapter: str | os.PathLike | None = None,
    peft: str | os.PathLike | None = None,
    esft: str | os.PathLike | None = None,
    dtype: str = "auto",
    load_in_4bit: bool = False,
    device: str | None = None,
    device_map: str | dict | None = None,
    batch_size: int | str = 1,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    log_samples: bool = False,
    output_path: str | os.PathLike | None = None,
    include_path=None,
    data_dir: str | os.PathLike | None = None,
    bootstrap_iters: int = 100000,
    paper_model: str | None = None,
    model_card: bool = False,
    extra_model_args: dict | None = None,
    **simple_evaluate_kwargs,
) -> Evaluation:
    """Evaluate a DeepSeekMoE checkpoint (optionally with a LoRA or ESFT adapter: ``adapter``, or under the old names
    ``peft`` / ``esft``) with lm-evaluation-harness.

    ``tasks`` are lm-eval task or group names (the paper suite: ``paper_base``, ``paper_chat``, ``*_local``; the tiny
    offline suite: ``dsmoe_tiny``), YAML paths or inline configs. ``data_dir`` holds the files of the local paper
    tasks. With ``output_path`` lm-eval's results JSON (and samples with ``log_samples``) are written as the
    ``lm-eval`` command writes them, plus the markdown table beside the JSON; ``model_card=True`` writes the table
    into the README.md of the adapter (if any) or of ``pretrained``. Other keyword arguments go to
    ``lm_eval.simple_evaluate`` (``apply_chat_template``, ``gen_kwargs``, ``confirm_run_unsafe_code``, ...).
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    metadata = {"data_dir": str(data_dir)} if data_dir is not None else None
    manager = suite.build_task_manager(task_list, include_path=include_path, metadata=metadata)
    args = model_args(pretrained, adapter=adapter, peft=peft, esft=esft, dtype=dtype, load_in_4bit=load_in_4bit,
                      device_map=device_map, **(extra_model_args or {}))  # fmt: skip
    card_dir = report.card_directory(args) if model_card else None  # fail before evaluating, not after
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path is not None else None
    started = time.time()
    results = lm_eval.simple_evaluate(
        model=MODEL_NAME, model_args=args, tasks=task_list, num_fewshot=num_fewshot, batch_size=batch_size,
        device=device or default_device(), limit=limit, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
        task_manager=manager, evaluation_tracker=tracker, **simple_evaluate_kwargs,
    )  # fmt: skip
    samples = results.pop("samples", None)
    outcome = Evaluation(results=results, markdown=report.markdown_report(results, paper_model), samples=samples)
    if tracker is not None:
        outcome.results_file = _save(tracker, results, samples, output_path, started)
        outcome.markdown_file = report.write_markdown_beside(outcome.results_file, outcome.markdown)
    if card_dir is not None:
        outcome.model_card = report.write_model_card(card_dir, results, paper_model)
    return outcome


def _save(tracker, results: dict, samples: dict | None, output_path, started: float) -> Path:
    """Write lm-eval's files the way its command line does; returns the results JSON."""
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"] if samples else []:
        # the tracker rewrites the samples it writes (arguments, responses as strings): give it copies
        tracker.save_results_samples(task_name=task_name, samples=[dict(sample) for sample in samples[task_name]])
    return report.latest_results_file(output_path, since=started)
