"""Stand-in for transformers' `tests/exporters/test_export.py`, which the sdist does not ship.

`ModelTesterMixin` inherits `ExportTesterMixin`; with this empty one it brings no `torch.export` test.
"""


class ExportTesterMixin:
    """Empty: the real mixin is not in the sdist."""
