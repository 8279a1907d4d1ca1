"""`deepseekmoe footprint`: the weight-memory table of a DeepSeekMoE config (`modeling_deepseekmoe.footprint`)."""

import argparse
import sys

from modeling_deepseekmoe import DeepseekMoEConfig
from modeling_deepseekmoe.footprint import format_footprint, load_config, memory_footprint


def print_footprint(config: DeepseekMoEConfig | None = None, file=None):
    """Print the footprint table of `config` (default: deepseek-moe-16b) and return it."""
    table = memory_footprint(config if config is not None else DeepseekMoEConfig())
    print(format_footprint(table), file=file or sys.stdout)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Weight memory of a DeepSeekMoE in bf16, 8-bit and 4-bit.")
    parser.add_argument("--config", help="model directory, config.json or hub id (default: deepseek-moe-16b)")
    args = parser.parse_args(argv)
    print_footprint(load_config(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
