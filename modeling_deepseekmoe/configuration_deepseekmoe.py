"""DeepSeekMoE configuration, reading and writing the released `config.json` (`model_type: "deepseek"`) unchanged."""

import os
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


# The class names that the released config.json and every other engine (vLLM, SGLang, llama.cpp) dispatch on.
RELEASED_ARCHITECTURE_NAMES = {
    "DeepseekMoEForCausalLM": "DeepseekForCausalLM",
    "DeepseekMoEModel": "DeepseekModel",
}
# RoPE variants of the reference implementation: plain, position interpolation, dynamic NTK (no YaRN).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic")
SUPPORTED_ROPE_SCALING_TYPES = ("linear", "dynamic")
DEFAULT_ROPE_THETA = 10000.0
# Keys every released config.json has and the architecture reads: a config.json without one of them describes some
# model this config cannot guess (the reference's defaults are a dense 7B, this class's the 16B), so it is refused.
REQUIRED_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "first_k_dense_replace", "moe_layer_freq", "norm_topk_prob", "scoring_func", "hidden_act", "rms_norm_eps",
    "max_position_embeddings",
)  # fmt: skip
POSITIVE_SIZES = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
)  # fmt: skip


@strict
class DeepseekMoEConfig(PreTrainedConfig):
    r"""
    Configuration of a DeepSeekMoE model. Every attribute carries the name it has in the released `config.json`;
    `DeepseekMoEConfig()` with no arguments describes deepseek-moe-16b-base.

    Args:
        vocab_size: rows of the embedding and the LM head (102400 for the released model, whose tokenizer has
            100015 tokens; the extra rows are padding).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads:
            transformer sizes; `intermediate_size` is the width of the dense MLP layers.
        moe_intermediate_size: width of one routed expert (and of one shared expert).
        n_routed_experts: routed experts per MoE layer; `None` makes every layer a dense MLP.
        n_shared_experts: always-on experts per MoE layer, stored as one MLP of width
            `n_shared_experts * moe_intermediate_size`; `0` or `None` means no shared experts.
        num_experts_per_tok: experts chosen per token by the router (top-k).
        first_k_dense_replace: the first k layers use a dense MLP.
        moe_layer_freq: from layer `first_k_dense_replace` on, layer `i` is a MoE layer when `i % moe_layer_freq == 0`.
        norm_topk_prob: renormalise the top-k routing weights to sum to 1 (off in the released model).
        scoring_func: the router's scoring function; only `"softmax"` exists.
        aux_loss_alpha: weight of the expert-balance loss added inside every MoE layer during training (0 disables it).
        seq_aux: compute the balance loss per sequence (paper's sequence-level loss) rather than over the batch.
        aux_loss_ignore_padding: leave padding tokens (attention_mask == 0) out of the balance-loss statistics; the
            reference counts them, so this is off by default.
        output_router_logits: return each MoE layer's router logits (and the aux loss value) from `forward`.
        rope_parameters: RoPE as transformers 5 spells it, `{"rope_type": "default"|"linear"|"dynamic",
            "rope_theta": base, "factor": f > 1}` (no factor for "default"). The released keys `rope_theta` and
            `rope_scaling` (`{"type": "linear"|"dynamic", "factor": f}` or null) are accepted too, are attributes
            derived from `rope_parameters`, and are what `config.json` stores (no `rope_parameters` key), so the
            reference code and other engines read a saved config unchanged.
        pretraining_tp: kept for compatibility; the reference's tensor-parallel split computes the same product.
    """

    model_type = "deepseek"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache output before / from transformers 5.24

    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    num_experts_per_tok: int | None = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float | int = 0.001
    seq_aux: bool = True
    aux_loss_ignore_padding: bool = False
    output_router_logits: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not self.n_shared_experts:
            self.n_shared_experts = None
        self.rope_parameters = merged_rope_parameters(
            self.rope_parameters, kwargs.pop("rope_scaling", None), kwargs.pop("rope_theta", None)
        )
        super().__post_init__(**kwargs)

    @property
    def rope_theta(self) -> float:
        """The released config's RoPE base, `rope_parameters["rope_theta"]`."""
        return self.rope_parameters["rope_theta"]

    @rope_theta.setter
    def rope_theta(self, value: float):
        self.rope_parameters = {**self.rope_parameters, "rope_theta": value}

    @property
    def rope_scaling(self) -> dict | None:
        """The released config's spelling of the scaling: `{"type": ..., "factor": ...}`, or None without scaling."""
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            return None
        return {"type": rope_type, "factor": self.rope_parameters.get("factor")}

    @rope_scaling.setter
    def rope_scaling(self, value: dict | None):
        self.rope_parameters = merged_rope_parameters(None, value or {"rope_type": "default"}, self.rope_theta)

    @property
    def torch_dtype(self):
        """The released config.json's name for `dtype` (kept on save, so it is read back without a warning)."""
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value):
        self.dtype = value

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def validate_architecture(self):
        """Called by `@strict` at construction: every message names the attribute and how to fix it."""
        for name in POSITIVE_SIZES:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer (got {getattr(self, name)}).")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0 (got {self.rms_norm_eps}); the released model uses 1e-06.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not an activation transformers knows; the released model uses "
                "'silu'."
            )
        if not 0 <= self.attention_dropout <= 1:
            raise ValueError(f"attention_dropout must be in [0, 1] (got {self.attention_dropout}).")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); choose a head count that divides hidden_size."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}); set num_key_value_heads to a divisor of num_attention_heads."
            )
        if self.scoring_func != "softmax":
            raise ValueError(
                f"scoring_func={self.scoring_func!r} is not supported: DeepSeekMoE routers use 'softmax'; "
                "set scoring_func='softmax'."
            )
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1 (got {self.moe_layer_freq}); 1 makes every layer MoE.")
        if self.first_k_dense_replace < 0:
            raise ValueError(f"first_k_dense_replace must be >= 0 (got {self.first_k_dense_replace}).")
        if self.n_routed_experts is not None:
            if self.n_routed_experts < 1:
                raise ValueError(
                    f"n_routed_experts must be >= 1 (got {self.n_routed_experts}); use None for a dense model."
                )
            if self.num_experts_per_tok is None or self.num_experts_per_tok < 1:
                raise ValueError(
                    f"num_experts_per_tok must be >= 1 when n_routed_experts is set (got {self.num_experts_per_tok})."
                )
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) is larger than n_routed_experts "
                    f"({self.n_routed_experts}): a token cannot pick more experts than exist; lower "
                    "num_experts_per_tok or raise n_routed_experts."
                )
        if self.n_shared_experts is not None and self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0 (got {self.n_shared_experts}); 0 means none.")
        if self.aux_loss_alpha < 0:
            raise ValueError(f"aux_loss_alpha must be >= 0 (got {self.aux_loss_alpha}); 0 disables the aux loss.")

    def validate_rope(self):
        """Replaces transformers' RoPE check (which only warns on an unknown type): the types the model implements,
        and only the keys they read."""
        rope = self.rope_parameters
        rope_type, theta, factor = rope.get("rope_type"), rope.get("rope_theta"), rope.get("factor")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES} in rope_parameters "
                f"(or rope_scaling type {' / '.join(SUPPORTED_ROPE_SCALING_TYPES)}, or null): the reference "
                "implementation knows no other."
            )
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise ValueError(f"rope_theta must be a number > 0 (got {theta!r}); the released model uses 10000.")
        scaled = rope_type != "default"
        if scaled and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1):
            raise ValueError(f"rope_scaling factor must be a number > 1 for {rope_type!r} RoPE (got {factor!r}).")
        unused = sorted(set(rope) - {"rope_type", "rope_theta", "factor", "partial_rotary_factor"})
        if rope_type == "default" and factor is not None:
            unused.append("factor")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            unused.append("partial_rotary_factor")
        if unused:
            raise ValueError(
                f"rope_parameters {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by {rope_type!r} "
                "RoPE over the full head dimension; remove them (read: rope_type, rope_theta, factor)."
            )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """As in transformers (every `from_pretrained` and `AutoConfig` load comes here), refusing a config.json
        without one of the keys the architecture depends on (`REQUIRED_CONFIG_KEYS`)."""
        absent = [key for key in REQUIRED_CONFIG_KEYS if key not in config_dict and key not in kwargs]
        if "rope_theta" not in config_dict and "rope_parameters" not in config_dict and "rope_theta" not in kwargs:
            absent.append("rope_theta")
        if absent:
            raise ValueError(
                f"config.json has no {', '.join(absent)}: every DeepSeekMoE config.json states "
                f"{'it' if len(absent) == 1 else 'them'} (deepseek-moe-16b: {_released_values(absent)}); add the "
                "checkpoint's value(s) rather than relying on a default."
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DeepseekMoEConfig":
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            hint = " (DeepSeek-V2/V3 use multi-head latent attention: load them with transformers' own classes)"
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a config of model_type {model_type!r}, not "
                f"{cls.model_type!r}: it is not a DeepSeekMoE (v1) checkpoint"
                f"{hint if str(model_type).startswith('deepseek') else ''}; load it with the class for its type."
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # Keep the released spelling that vLLM / llama.cpp read: `rope_theta` / `rope_scaling` (not `rope_parameters`),
        # `torch_dtype`, the released class names.
        output.pop("rope_parameters", None)
        output["rope_theta"], output["rope_scaling"] = self.rope_theta, self.rope_scaling
        if "dtype" in output:
            output["torch_dtype"] = output.pop("dtype")
        if output.get("architectures"):
            output["architectures"] = [RELEASED_ARCHITECTURE_NAMES.get(a, a) for a in output["architectures"]]
        return output


def merged_rope_parameters(rope_parameters: dict | None, rope_scaling: dict | None, rope_theta: float | None) -> dict:
    """One `rope_parameters` dict from the transformers 5 key and the released keys (either may be given, both if they
    agree): `rope_type` ("type" is its released spelling), `rope_theta` (default 10000.0) and, when scaled, `factor`."""
    sources = {}
    for source_name, source in (("rope_parameters", rope_parameters), ("rope_scaling", rope_scaling)):
        if source is None:
            continue
        if not isinstance(source, dict):
            raise TypeError(f"{source_name} must be a dict or null (got {source!r}).")
        source = dict(source)
        if "type" in source:
            released_type = source.pop("type")
            if source.setdefault("rope_type", released_type) != released_type:
                raise ValueError(
                    f"{source_name} has type={released_type!r} and rope_type={source['rope_type']!r}; keep one."
                )
        sources[source_name] = source
    if rope_theta is not None:
        sources["rope_theta"] = {"rope_theta": rope_theta}
    merged = {}
    for source_name, source in sources.items():
        for key, value in source.items():
            if key in merged and merged[key] != value:
                raise ValueError(
                    f"RoPE {key} is {merged[key]!r} in one argument and {value!r} in {source_name}; give it once "
                    "(rope_parameters, or the released rope_scaling / rope_theta)."
                )
            merged[key] = value
    merged.setdefault("rope_type", "default")
    merged.setdefault("rope_theta", DEFAULT_ROPE_THETA)
    return merged


def _released_values(keys: list[str]) -> str:
    released = DeepseekMoEConfig.__dataclass_fields__
    values = {key: released[key].default for key in keys if key in released}
    values.update({"model_type": DeepseekMoEConfig.model_type, "rope_theta": 10000})
    return ", ".join(f"{key}={values[key]!r}" for key in keys if key in values)


__all__ = ["DeepseekMoEConfig"]
