"""Drops bitsandbytes' import-time notice that the optional `kernels` package is missing.

bitsandbytes (0.50) logs "Failed to load CPU gemm_4bit_forward from kernels-community: ..." on every import on a CPU
with AVX512-BF16 when `kernels` is not installed, even though its own packed kernel then runs; it is printed before any
command (`deepseekmoe --help` included) and asks for a download from the Hub. Only that record is filtered, on the one
logger that emits it: every other bitsandbytes warning still reaches the user.
"""

import logging


_NOTICE_LOGGER = "bitsandbytes.backends.cpu.ops"
_NOTICE_PREFIX = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _KernelsNoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOTICE_PREFIX)


def silence_bitsandbytes_kernels_notice() -> None:
    """Install the filter (idempotent). It must run before bitsandbytes is first imported, which logs the notice."""
    logger = logging.getLogger(_NOTICE_LOGGER)
    if not any(isinstance(existing, _KernelsNoticeFilter) for existing in logger.filters):
        logger.addFilter(_KernelsNoticeFilter())


silence_bitsandbytes_kernels_notice()
