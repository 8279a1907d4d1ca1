"""transformers' own model-test mixins (`ModelTesterMixin`, `ConfigTester`, the training and tensor-parallel mixins)
run against the DeepSeekMoE classes, the way an in-tree model's test file runs them (transformers'
`tests/models/qwen2_moe/test_modeling_qwen2_moe.py`), on a tiny config on CPU.

The mixins come from the sdist of the installed transformers (`tests/transformers_mixins/fetch.py`; CI fetches it
before pytest) and need `parameterized` (in the `dev` extra). Not run, because the sdist does not ship them:
`GenerationTesterMixin`, `ExportTesterMixin` (torch.export), `CausalLMModelTest`, and `PipelineTesterMixin` (which
also needs the Hub's tiny models).
"""

import os
import sys
import unittest
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
from transformers.models.auto import modeling_auto

from modeling_deepseekmoe import (
    DeepseekMoEConfig,
    DeepseekMoEForCausalLM,
    DeepseekMoEForSequenceClassification,
    DeepseekMoEModel,
)
from modeling_deepseekmoe.checkpoint import CheckpointError

from transformers_mixins import fetch

try:
    sys.path.insert(0, str(fetch.ensure_transformers_tests()))
except fetch.TransformersTestsUnavailable as err:
    if os.environ.get("CI"):  # .ci/run fetches the sdist before pytest: in CI its absence is a failure, not a skip
        raise
    pytest.skip(f"transformers' test mixins are unavailable: {err}", allow_module_level=True)

with warnings.catch_warnings():  # their pytest marks (flash_attn_test, ...) are registered only in transformers' repo
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from transformers_tests import test_modeling_common
    from transformers_tests.test_configuration_common import ConfigTester
    from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
    from transformers_tests.test_tensor_parallel_mixin import TensorParallelTesterMixin
    from transformers_tests.test_training_mixin import TrainingTesterMixin


class Difference(NamedTuple):
    reason: str
    # Where the difference is a refusal: the error the mixin test must stop with (the test runs up to it).
    raises: tuple[type[Exception], str] | None = None
    # Where only some classes differ (the mixin test loops over them in subTests): the classes it still runs on.
    model_classes: tuple[type, ...] | None = None


SHRINK = "resize_token_embeddings refuses to shrink the causal LM's padded embedding (102400 rows for a 100015-token "
SHRINK += "tokenizer) unless allow_shrink=True; the mixin shrinks it"
YARN_REFUSED = (ValueError, "rope_type 'yarn' is not supported")

# Mixin tests that fail because DeepSeekMoE differs from transformers' defaults on purpose, or that need a file the
# sdist does not ship. Every other mixin test passes, or skips by itself (no GPU, no Hub, a feature the model lacks).
INTENTIONAL_DIFFERENCES = {
    "test_resize_tokens_embeddings": Difference(SHRINK, raises=(ValueError, "would shrink the embedding")),
    "test_resize_embeddings_untied": Difference(
        SHRINK, model_classes=(DeepseekMoEModel, DeepseekMoEForSequenceClassification)
    ),
    "test_model_weights_reload_no_missing_tied_weights": Difference(
        "loading refuses a checkpoint that would leave tensors randomly initialised; the mixin loads one holding "
        "none of the model's tensors",
        raises=(CheckpointError, r"missing tensor\(s\)"),
    ),
    "test_model_rope_scaling_frequencies": Difference(
        "RoPE is the reference's: default, linear and dynamic NTK, which the mixin checks first; YaRN, its last "
        "case, is refused",
        raises=YARN_REFUSED,
    ),
    "test_model_rope_scaling_from_config_2_yarn": Difference(
        "YaRN RoPE is refused: the reference implements default, linear and dynamic NTK only", raises=YARN_REFUSED
    ),
    "test_generation_tester_mixin_inheritance": Difference(
        "checks the test class inherits GenerationTesterMixin, whose file (tests/generation/test_utils.py) the "
        "sdist does not ship"
    ),
}


class DeepseekMoEModelTester:
    """A 2-layer DeepSeekMoE: layer 0 dense, layer 1 MoE with 4 routed experts (top-2) and a shared expert."""

    base_model_class = DeepseekMoEModel
    causal_lm_class = DeepseekMoEForCausalLM
    sequence_classification_class = DeepseekMoEForSequenceClassification

    def __init__(self, parent, batch_size=13, seq_length=7, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.num_labels = 3
        self.pad_token_id = 0

    def get_config(self) -> DeepseekMoEConfig:
        return DeepseekMoEConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=37,
            moe_intermediate_size=16,  # grouped_mm wants 16-byte row strides in fp16/bf16
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            max_position_embeddings=64,
            num_labels=self.num_labels,
            pad_token_id=self.pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(autouse=True, scope="module")
def registered_like_an_in_tree_model():
    """The mixins find a model's task (base / causal LM / classifier) by its class name in transformers' Auto name
    tables, which list only in-tree models; `AutoModel.register` fills other tables. Add ours while these run."""
    tables = [
        (modeling_auto.MODEL_MAPPING_NAMES, DeepseekMoEModel),
        (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, DeepseekMoEForCausalLM),
        (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, DeepseekMoEForSequenceClassification),
    ]
    for table, model_class in tables:
        table[DeepseekMoEConfig.model_type] = model_class.__name__
    yield
    for table, _ in tables:
        del table[DeepseekMoEConfig.model_type]


def apply_intentional_differences(test_class):
    """Each listed test is skipped with its reason, or run up to the refusal it must stop with, or run on the classes
    that do not differ."""
    for name, difference in INTENTIONAL_DIFFERENCES.items():
        if not hasattr(test_class, name):
            raise AssertionError(f"INTENTIONAL_DIFFERENCES names {name}, which the installed mixins do not define")
        mixin_test = getattr(test_class, name)
        if difference.raises is None and difference.model_classes is None:
            setattr(test_class, name, unittest.skip(difference.reason)(mixin_test))
            continue

        def run_with_difference(self, mixin_test=mixin_test, difference=difference):
            if difference.model_classes is not None:
                self.all_model_classes = difference.model_classes
            if difference.raises is None:
                return mixin_test(self)
            error, message = difference.raises
            with self.assertRaisesRegex(error, message, msg=difference.reason):
                mixin_test(self)

        run_with_difference.__doc__ = f"Intentional difference: {difference.reason}."
        setattr(test_class, name, run_with_difference)
    return test_class


@apply_intentional_differences
class DeepseekMoEModelTest(ModelTesterMixin, TrainingTesterMixin, TensorParallelTesterMixin, unittest.TestCase):
    all_model_classes = (DeepseekMoEModel, DeepseekMoEForCausalLM, DeepseekMoEForSequenceClassification)
    # The mixin dates models by a copyright line, which this project's files do not carry.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = DeepseekMoEModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=DeepseekMoEConfig, hidden_size=64, num_attention_heads=8, num_key_value_heads=8
        )

    def test_config(self):
        self.config_tester.run_common_tests()


def test_mixins_come_from_the_installed_transformers(monkeypatch):
    import transformers

    assert f"/{transformers.__version__}/" in test_modeling_common.__file__.replace("\\", "/")
    # Fetched once per version: a second call never downloads.
    monkeypatch.setattr(fetch, "_download_sdist", lambda *args: pytest.fail("downloaded the sdist again"))
    assert fetch.ensure_transformers_tests() == Path(test_modeling_common.__file__).parents[1]
