"""DeepSeekMoE as a native transformers model.

Importing this package registers the `deepseek` model type with the Auto classes and the checkpoint conversion that
maps the released per-expert keys onto the fused expert tensors (and back on save).
"""

from . import _bnb_noise  # noqa: F401  (before anything imports bitsandbytes: drops its `kernels` package notice)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

from .configuration_deepseekmoe import DeepseekMoEConfig
from .modeling_deepseekmoe import (
    DeepseekMoEForCausalLM,
    DeepseekMoEForSequenceClassification,
    DeepseekMoEModel,
    DeepseekMoEPreTrainedModel,
)


def _register() -> None:
    AutoConfig.register(DeepseekMoEConfig.model_type, DeepseekMoEConfig, exist_ok=True)
    AutoModel.register(DeepseekMoEConfig, DeepseekMoEModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekMoEConfig, DeepseekMoEForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(DeepseekMoEConfig, DeepseekMoEForSequenceClassification, exist_ok=True)
    # Released layout: model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight <-> fused gate_up_proj / down_proj.
    register_checkpoint_conversion_mapping(
        DeepseekMoEConfig.model_type,
        [
            WeightConverter(
                source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
                target_patterns="mlp.experts.gate_up_proj",
                operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
            ),
            WeightConverter(
                source_patterns="mlp.experts.*.down_proj.weight",
                target_patterns="mlp.experts.down_proj",
                operations=[MergeModulelist(dim=0)],
            ),
        ],
        overwrite=True,
    )


_register()

__all__ = [
    "DeepseekMoEConfig",
    "DeepseekMoEForCausalLM",
    "DeepseekMoEForSequenceClassification",
    "DeepseekMoEModel",
    "DeepseekMoEPreTrainedModel",
]
