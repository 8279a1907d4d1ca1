"""Stand-in for transformers' `tests/utils/test_configuration_utils.py`, which the sdist does not ship.

`ConfigTester.check_config_arguments_init` builds a config from `config_common_kwargs` and checks each value is kept:
here, every attribute `PreTrainedConfig` itself declares, each set to a value other than its default.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": True,
    "architectures": ["SomeArchitecture"],
    "id2label": {0: "negative", 1: "neutral", 2: "positive"},
    "label2id": {"negative": 0, "neutral": 1, "positive": 2},
    "problem_type": "multi_label_classification",
}
