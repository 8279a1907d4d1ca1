"""Stand-in for transformers' `tests/generation/test_utils.py`, which the sdist does not ship.

`test_modeling_common` imports `GenerationTesterMixin` from it only to check, in
`test_generation_tester_mixin_inheritance`, that a model able to generate is tested by it. No `generate` test comes
from here; that check is skipped by name in `tests/test_transformers_mixins.py`.
"""


class GenerationTesterMixin:
    """Empty: the real mixin is not in the sdist."""
