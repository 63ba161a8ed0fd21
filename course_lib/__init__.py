"""LLM Fine-Tuning From Scratch: tested reference implementations behind the course notebooks."""

import logging

__version__ = "0.1.0"


class _DropBitsandbytesHubKernelNotice(logging.Filter):
    """On CPUs with AVX-512 BF16, importing bitsandbytes tries to fetch an optional CPU kernel from the
    Hugging Face Hub ("kernels-community") and logs a warning when it cannot — which is always, offline,
    and every lesson and kernel would print it. bitsandbytes then uses its own kernel, so the notice says
    nothing a learner can act on. Only that one message is dropped; every other warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBitsandbytesHubKernelNotice())
