"""Native transformers implementation of DeepSeekMoE (deepseek-moe-16b-base / -chat and same-architecture models).

Numerics follow the released remote code: bf16 router logits and softmax (no fp32 upcast), unsorted top-k, no
renormalisation unless `norm_topk_prob`, shared experts added unweighted, RMSNorm cast-then-weight, RoPE tables in
the activation dtype, fp32 logits, and the expert-balance loss injected into the gradient inside every MoE layer.
Routed experts are stored fused (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) and run through transformers'
experts interface; the implementations added here (`"sorted_loop"`, `"auto"`) live in `experts_kernels.py`.
"""

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.generation.logits_process import SuppressTokensLogitsProcessor
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from . import experts_kernels  # noqa: F401  (registers the "sorted_loop" and "auto" experts implementations)
from .experts_kernels import activation_function
from .checkpoint import BASE_MODEL, CAUSAL_LM, HEAD_TENSORS, kind_of_architectures, validate_checkpoint
from .configuration_deepseekmoe import DeepseekMoEConfig


# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache` (the old name is
# deprecated there, "to be removed in 5.40"); earlier 5.x releases only know `past_key_values`, and their `generate`
# passes the cache under that name. The forwards take `cache`, and the outputs use the name of the installed release.
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def accepts_past_key_values(forward: Callable) -> Callable:
    """Let a forward that takes `cache` also take `past_key_values`: deprecated (as in-tree models do) on releases
    that renamed it, silently where it is still the current name."""
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def forward_with_current_name(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return forward_with_current_name


# The released tokenizer has 100015 tokens for the 102400 embedding rows; the rest are padding never to be generated.
RELEASED_VOCAB_SIZE, RELEASED_BOS_TOKEN_ID, RELEASED_TOKENIZER_SIZE = 102400, 100000, 100015


class DeepseekMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        # Cast back before the weight multiply, as the reference does.
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class DeepseekMoERotaryEmbedding(nn.Module):
    """NeoX-style RoPE over the full head dim, with the reference's `linear` and dynamic-NTK scaling."""

    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        self.config = config
        self.dim = config.head_dim
        rope = config.rope_parameters
        self.base = float(rope["rope_theta"])
        self.max_position_embeddings = config.max_position_embeddings
        self.scaling_type = rope.get("rope_type", "default")
        if self.scaling_type not in ("default", "linear", "dynamic"):
            raise ValueError(f"rope_type {self.scaling_type!r} is not supported: use 'default', 'linear' or 'dynamic'.")
        self.scaling_factor = float(rope.get("factor") or 1.0)
        self.inv_freq = nn.Buffer(self.compute_inv_freq(self.base), persistent=False)

    def compute_inv_freq(self, base: float | torch.Tensor) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        if isinstance(base, torch.Tensor):
            exponents = exponents.to(base.device)
        return 1.0 / (base**exponents)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = position_ids.float()
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        if self.scaling_type == "linear":
            positions = positions / self.scaling_factor
        elif self.scaling_type == "dynamic":
            # NTK base growth once the sequence outgrows the trained context; computed on-device (no host sync).
            seq_len = positions.max() + 1
            ratio = (self.scaling_factor * seq_len / self.max_position_embeddings - (self.scaling_factor - 1)).clamp(
                min=1.0
            )
            inv_freq = self.compute_inv_freq(self.base * ratio ** (self.dim / (self.dim - 2))).to(x.device)
        freqs = positions[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        # Tables computed in fp32, applied in the activation dtype (the reference caches them in that dtype).
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, num_key_value_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DeepseekMoEAttention(nn.Module):
    def __init__(self, config: DeepseekMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class DeepseekMoEMLP(nn.Module):
    """SwiGLU MLP: the dense layers (`intermediate_size`) and the fused shared experts."""

    def __init__(self, config: DeepseekMoEConfig, intermediate_size: int | None = None):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekMoEGate(nn.Module):
    """Softmax top-k router. Holds a bare `weight` (not `nn.Linear`) so quantizers and `all-linear` LoRA skip it."""

    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.n_routed_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor):
        """hidden_states [N, H] -> (router_logits [N, E], scores [N, E], top_k_weights [N, K], top_k_index [N, K])."""
        # Logits and softmax stay in the activation dtype, like the reference: an fp32 upcast flips near-ties in bf16.
        router_logits = F.linear(hidden_states, self.weight.to(hidden_states.dtype))
        scores = router_logits.softmax(dim=-1)
        top_k_weights, top_k_index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, scores, top_k_weights, top_k_index


class AuxLossSegments(NamedTuple):
    """Which balance-loss segment each flattened token belongs to, and its weight (0 for ignored padding)."""

    segment_ids: torch.Tensor  # [N] long
    num_segments: int  # upper bound on the number of segments
    token_weight: torch.Tensor | None  # [N] float, or None for "every token counts"


def aux_loss_segments(
    config: DeepseekMoEConfig,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> AuxLossSegments:
    """Segments for the balance loss: one per sequence (`seq_aux`; a packed row splits where `position_ids` restart at
    0), or the whole batch. Padding counts unless `config.aux_loss_ignore_padding`."""
    num_tokens = batch_size * seq_len
    if not config.seq_aux:
        segment_ids, num_segments = torch.zeros(num_tokens, dtype=torch.long, device=device), 1
    elif position_ids is not None and position_ids.shape[-1] == seq_len:
        starts = position_ids.expand(batch_size, seq_len) == 0
        starts[:, 0] = True
        segment_ids, num_segments = starts.reshape(-1).long().cumsum(0) - 1, num_tokens
    else:
        segment_ids = torch.arange(batch_size, device=device).repeat_interleave(seq_len)
        num_segments = batch_size
    token_weight = None
    if config.aux_loss_ignore_padding and attention_mask is not None and attention_mask.dim() == 2:
        token_weight = attention_mask[:, -seq_len:].reshape(-1).to(device=device, dtype=torch.float32)
    return AuxLossSegments(segment_ids, num_segments, token_weight)


def expert_slot_counts(
    top_k_index: torch.Tensor,
    num_experts: int,
    token_weight: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    num_segments: int = 1,
) -> torch.Tensor:
    """[num_segments, E] float32: routing slots per expert of each segment (`segment_ids` [N], all tokens in one
    without); each (token, k) slot counts its token's weight (1 if not given, 0 for padding). The one per-expert load
    computation: the balance loss counts with it, and so does everything that reads routing
    (`modeling_deepseekmoe.routing.expert_counts`)."""
    slots = top_k_index if segment_ids is None else segment_ids[:, None] * num_experts + top_k_index
    slots = slots.reshape(-1)
    if token_weight is None:
        weight = torch.ones(slots.shape[0], device=slots.device, dtype=torch.float32)
    else:
        weight = token_weight.to(device=slots.device, dtype=torch.float32).repeat_interleave(top_k_index.shape[-1])
    counts = torch.zeros(num_segments * num_experts, device=slots.device, dtype=torch.float32)
    return counts.index_add_(0, slots, weight).view(num_segments, num_experts)


def expert_balance_loss(scores: torch.Tensor, top_k_index: torch.Tensor, segments: AuxLossSegments) -> torch.Tensor:
    """Paper Eq. 12-14 (N' = N, K' = K), without the alpha factor.

    Per segment s of T_s tokens: f_{s,i} = E / (K T_s) * #{(t, k): idx_{t,k} = i}, P_{s,i} = mean_t score_{t,i},
    loss = mean_s sum_i f_{s,i} P_{s,i}. With one segment per sequence this is the reference's `seq_aux` loss, with a
    single segment over the batch its expert-level loss. Runs without host synchronisation.
    """
    num_experts, top_k = scores.shape[-1], top_k_index.shape[-1]
    segment_ids, num_segments, weight = segments
    if weight is None:
        weight = torch.ones(scores.shape[0], device=scores.device, dtype=torch.float32)
    tokens = torch.zeros(num_segments, device=scores.device, dtype=torch.float32).index_add_(0, segment_ids, weight)
    counts = expert_slot_counts(top_k_index, num_experts, weight, segment_ids, num_segments)
    prob_sums = torch.zeros(num_segments, num_experts, device=scores.device, dtype=torch.float32)
    prob_sums = prob_sums.index_add(0, segment_ids, scores.float() * weight[:, None])
    denominator = tokens.clamp(min=1.0)[:, None]
    load = counts * num_experts / (top_k * denominator)
    per_segment = (load * (prob_sums / denominator)).sum(dim=-1)
    present = (tokens > 0).float()
    return (per_segment * present).sum() / present.sum().clamp(min=1.0)


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on `hidden_states` whose backward also sends a gradient of 1 into `loss`, so the balance loss joins
    the gradient of whatever loss is computed downstream, once, exactly as the reference injects it."""

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return hidden_states.view_as(hidden_states)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad_output.device)


@use_experts_implementation
class DeepseekMoEExperts(nn.Module):
    """The routed experts of one layer, fused: `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`.

    `forward` below is the readable per-expert reference loop (experts implementation `"eager"`); the default
    implementation is chosen through transformers' experts interface.
    """

    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        act = activation_function(self.act_fn)  # not the module: hooks must not fire once per hit expert
        for expert in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == expert)
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(act(gate) * up, self.down_proj[expert])
            expert_out = expert_out * top_k_weights[token_idx, slot, None]
            final_hidden_states.index_add_(0, token_idx, expert_out.to(final_hidden_states.dtype))
        return final_hidden_states


class DeepseekMoESparseMoeBlock(nn.Module):
    """Shared experts (always on, unweighted) + top-k routed experts."""

    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        self.config = config
        self.last_aux_loss: torch.Tensor | None = None
        self.gate = DeepseekMoEGate(config)
        self.experts = DeepseekMoEExperts(config)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekMoEMLP(
                config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
            )

    def forward(self, hidden_states: torch.Tensor, aux_segments: AuxLossSegments | None = None) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat_states = hidden_states.reshape(-1, hidden_dim)
        _, scores, top_k_weights, top_k_index = self.gate(flat_states)
        output = self.experts(flat_states, top_k_index, top_k_weights).view(batch_size, seq_len, hidden_dim)
        if self.training and self.config.aux_loss_alpha > 0 and torch.is_grad_enabled():
            if aux_segments is None:
                aux_segments = aux_loss_segments(self.config, batch_size, seq_len, hidden_states.device)
            aux_loss = self.config.aux_loss_alpha * expert_balance_loss(scores, top_k_index, aux_segments)
            output = AddAuxiliaryLoss.apply(output, aux_loss)
            # The injected value, for trainers to log (TRL's fused LM head never sees the model's `aux_loss` output).
            self.last_aux_loss = aux_loss.detach()
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        return output


class DeepseekMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekMoEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DeepseekMoEAttention(config, layer_idx)
        self.mlp = DeepseekMoESparseMoeBlock(config) if config.is_moe_layer(layer_idx) else DeepseekMoEMLP(config)
        self.input_layernorm = DeepseekMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        aux_segments: AuxLossSegments | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, DeepseekMoESparseMoeBlock):
            hidden_states = self.mlp(hidden_states, aux_segments)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class DeepseekMoEPreTrainedModel(PreTrainedModel):
    config: DeepseekMoEConfig
    config_class = DeepseekMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekMoEDecoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(DeepseekMoEGate, index=0),
        "hidden_states": DeepseekMoEDecoderLayer,
        "attentions": DeepseekMoEAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DeepseekMoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, DeepseekMoEGate):
            # The reference leaves the router at nn.Module's kaiming-uniform default.
            init.kaiming_uniform_(module.weight, a=5**0.5)
        elif isinstance(module, DeepseekMoERotaryEmbedding):
            # Non-persistent buffer: recompute it, since from_pretrained builds the model on the meta device.
            init.copy_(module.inv_freq, module.compute_inv_freq(module.base))

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        return super().get_correct_experts_implementation("auto" if requested_experts is None else requested_experts)

    # Buffers the reference code saved in old checkpoints; recomputed here, never loaded.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    # The task heads of the family (a checkpoint names them without prefix): the one a class has is newly initialised
    # when it loads a checkpoint another class saved; the others are dropped. As transformers does, and reports.
    _new_head_keys: tuple[str, ...] = tuple(HEAD_TENSORS.values())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict about the checkpoint. For a local directory the shards, tensor
        names, shapes and dtypes are checked against the config first (`validate_checkpoint`). Any class of the
        family loads what any class saved, in the released per-expert layout or transformers' fused one: a head the
        checkpoint lacks because another class saved it is newly initialised and a head of another task is dropped;
        any other tensor that would be left random or ignored is an error naming it, and so is a shape mismatch
        unless `ignore_mismatched_sizes=True` (then the mismatched tensors are re-initialised, as in transformers)."""
        from .quantization import finalize_quantized_experts, is_prequantized, quantized_experts_loading

        output_loading_info = kwargs.pop("output_loading_info", False)
        saved_by = None
        directory = pretrained_model_name_or_path
        if directory is not None and kwargs.get("subfolder"):
            directory = os.path.join(directory, kwargs["subfolder"])
        if directory is not None and os.path.isdir(directory) and kwargs.get("gguf_file") is None:
            config = kwargs.get("config")
            if not isinstance(config, DeepseekMoEConfig):
                config = DeepseekMoEConfig.from_pretrained(directory)
            # A quantized save stores bitsandbytes statistics next to each weight; the load report below checks it.
            if not is_prequantized(config):
                saved_by = validate_checkpoint(
                    directory,
                    config,
                    ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False),
                    use_safetensors=kwargs.get("use_safetensors"),
                    variant=kwargs.get("variant"),
                )
        # With a bitsandbytes config the routed experts are built quantized too (see quantization.py).
        with quantized_experts_loading(pretrained_model_name_or_path, kwargs) as load_kwargs:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **load_kwargs
            )
        finalize_quantized_experts(model)
        # `from_pretrained(None, config=..., state_dict={})` loads nothing on purpose: a freshly initialised model.
        builds_fresh = pretrained_model_name_or_path is None and not kwargs.get("state_dict")
        problems = model._tensors_not_loaded(loading_info, saved_by or kind_of_architectures(model.config))
        if problems and not builds_fresh:
            details = "; ".join(f"{kind}: {', '.join(sorted(keys)[:5])}" for kind, keys in problems.items())
            raise ValueError(
                f"Loading {pretrained_model_name_or_path} into {cls.__name__} is incomplete: {details}. Check that "
                "the checkpoint matches its config.json and that no from_pretrained argument changes the model's "
                "sizes (num_hidden_layers, n_routed_experts, ...)."
            )
        if isinstance(model, GenerationMixin):
            model.apply_generation_defaults()
        return (model, loading_info) if output_loading_info else model

    def _tensors_not_loaded(self, loading_info: dict, saved_by: str) -> dict[str, list[str]]:
        """The load report's tensors that are neither loaded nor allowed by transformers' rules for another class's
        checkpoint (see `from_pretrained`), by what would happen to them."""
        own_heads = {key for key in self._new_head_keys if key in self.state_dict()}
        own_kind = next((kind for kind, key in HEAD_TENSORS.items() if key in own_heads), BASE_MODEL)
        new_heads = own_heads if saved_by != own_kind else set()
        droppable = set(self._new_head_keys) - own_heads
        if self.config.tie_word_embeddings:
            droppable.add(HEAD_TENSORS[CAUSAL_LM])
        problems = {
            "missing (would be randomly initialised)": [k for k in loading_info["missing_keys"] if k not in new_heads],
            "unexpected (would be ignored)": [k for k in loading_info["unexpected_keys"] if k not in droppable],
        }
        return {kind: keys for kind, keys in problems.items() if keys}


class DeepseekMoEModel(DeepseekMoEPreTrainedModel):
    def __init__(self, config: DeepseekMoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DeepseekMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = DeepseekMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekMoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        aux_segments = None
        if self.training and self.config.aux_loss_alpha > 0:
            aux_segments = aux_loss_segments(
                self.config, *inputs_embeds.shape[:2], inputs_embeds.device, attention_mask, position_ids
            )
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # The cache goes by position: its keyword is `past_key_values` before transformers 5.24, `cache` from 5.24 on.
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                aux_segments=aux_segments,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache if use_cache else None})


def router_aux_loss(
    config: DeepseekMoEConfig,
    router_logits: tuple[torch.Tensor, ...],
    batch_size: int,
    seq_len: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The balance loss the MoE layers inject, recomputed from their router logits for reporting: the sum over MoE
    layers of `aux_loss_alpha * loss_layer`, with the same routing (softmax and top-k in the logits' dtype)."""
    segments = aux_loss_segments(config, batch_size, seq_len, router_logits[0].device, attention_mask, position_ids)
    total = torch.zeros((), device=router_logits[0].device, dtype=torch.float32)
    for layer_logits in router_logits:
        scores = layer_logits.softmax(dim=-1)
        top_k_index = torch.topk(scores, k=config.num_experts_per_tok, dim=-1, sorted=False).indices
        total = total + expert_balance_loss(scores, top_k_index, segments)
    return config.aux_loss_alpha * total


class _SuppressTokensByMask(SuppressTokensLogitsProcessor):
    """`SuppressTokensLogitsProcessor` with its vocabulary mask built once instead of by `torch.isin` at every step:
    for the 2385 padding ids of the released vocabulary that took longer than a 4-bit 16B decode step on CPU."""

    def __init__(self, suppress_tokens: torch.Tensor):
        self.suppress_tokens = suppress_tokens
        self._mask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is None or mask.shape[0] != scores.shape[-1] or mask.device != scores.device:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            ids = self.suppress_tokens.to(scores.device)
            mask[ids[(ids >= 0) & (ids < scores.shape[-1])]] = True
            self._mask = mask
        return scores.masked_fill(mask, -float("inf"))


class DeepseekMoEForCausalLM(DeepseekMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DeepseekMoEConfig):
        super().__init__(config)
        self.model = DeepseekMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.apply_generation_defaults()

    def apply_generation_defaults(self, tokenizer_size: int | None = None) -> None:
        """pad = EOS (as the released READMEs set it) and never generate ids past the tokenizer: `tokenizer_size`
        given, or the released tokenizer's 100015 for the released 102400-row embedding."""
        generation_config = self.generation_config
        if generation_config.pad_token_id is None:
            eos = generation_config.eos_token_id if generation_config.eos_token_id is not None else self.config.eos_token_id
            generation_config.pad_token_id = eos[0] if isinstance(eos, list) else eos
        if tokenizer_size is None and (self.config.vocab_size, self.config.bos_token_id) == (
            RELEASED_VOCAB_SIZE,
            RELEASED_BOS_TOKEN_ID,
        ):
            tokenizer_size = RELEASED_TOKENIZER_SIZE
        if tokenizer_size is not None and tokenizer_size < self.config.vocab_size:
            generation_config.suppress_tokens = list(range(tokenizer_size, self.config.vocab_size))

    def _get_logits_processor(self, *args, **kwargs):
        processors = super()._get_logits_processor(*args, **kwargs)
        for index, processor in enumerate(processors):
            if type(processor) is SuppressTokensLogitsProcessor:
                processors[index] = _SuppressTokensByMask(processor.suppress_tokens)
        return processors

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, allow_shrink: bool = False, **kwargs):
        """As in transformers, but shrinking is refused unless `allow_shrink=True`: the released embedding has 102400
        rows for a 100015-token tokenizer on purpose, and `resize_token_embeddings(len(tokenizer))` would cut the
        checkpoint's layout (and its compatibility with other engines) for nothing."""
        if new_num_tokens is not None and new_num_tokens < self.config.vocab_size and not allow_shrink:
            raise ValueError(
                f"resize_token_embeddings({new_num_tokens}) would shrink the embedding from {self.config.vocab_size} "
                "rows. DeepSeekMoE pads its embedding beyond the tokenizer on purpose and unused ids are never "
                "generated; pass allow_shrink=True if you really want a smaller matrix."
            )
        return super().resize_token_embeddings(new_num_tokens, *args, **kwargs)

    @can_return_tuple
    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        labels: next-token targets (-100 is ignored). `loss` is the cross-entropy only; in training mode the expert
            balance loss is already part of the gradient (injected in every MoE layer, as in the reference).
        output_router_logits: return every MoE layer's router logits and `aux_loss`, the value of that balance loss.
        logits_to_keep: compute logits for only the last `logits_to_keep` positions (0 = all).
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        # The reference returns fp32 logits.
        logits = self.lm_head(hidden_states[:, slice_indices, :]).float()

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        aux_loss = None
        if output_router_logits and outputs.router_logits:
            aux_loss = router_aux_loss(
                self.config, outputs.router_logits, *hidden_states.shape[:2], attention_mask, position_ids
            )
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


class DeepseekMoEForSequenceClassification(GenericForSequenceClassification, DeepseekMoEPreTrainedModel):
    """The backbone's hidden state at each sequence's last non-padding token through `score` (`num_labels` outputs)."""


__all__ = [
    "DeepseekMoEForCausalLM",
    "DeepseekMoEForSequenceClassification",
    "DeepseekMoEModel",
    "DeepseekMoEPreTrainedModel",
]
