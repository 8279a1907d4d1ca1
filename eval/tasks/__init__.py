"""lm-eval task configs shipped with the project (``deepseekmoe.eval.tasks``).

- ``tiny/``: tiny offline tasks in real benchmark formats (ARC-style multiple choice, TriviaQA-style exact match,
  Pile-style bits per byte) and their group ``dsmoe_tiny``; the data lives in ``data/tiny/``. For tests and the demo.
- ``paper/``: the DeepSeekMoE paper suite as lm-eval groups (``paper_base``, ``paper_chat`` for the benchmarks lm-eval
  has; ``paper_base_local``, ``paper_chat_local`` for the ones it lacks, read from user-supplied files), the local task
  configs and ``mapping.json`` (paper benchmark -> lm-eval task, metric, what differs from the paper).
- ``data/samples/``: a few made-up rows in the real format of each local benchmark, to try the local tasks.

Pass :data:`TASKS_DIR` to lm-eval as an include path (the ``deepseekmoe eval`` command does it for you).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
"""The directory to hand lm-eval as ``include_path``."""

DATA_DIR = TASKS_DIR / "data"
"""Data files shipped with the tasks (tiny tasks and sample files)."""

SAMPLES_DIR = DATA_DIR / "samples"
"""Made-up rows in the format of each local paper benchmark; usable as ``data_dir`` to try the local tasks."""

PAPER_DIR = TASKS_DIR / "paper"

__all__ = ["DATA_DIR", "PAPER_DIR", "SAMPLES_DIR", "TASKS_DIR"]
