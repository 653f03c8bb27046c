"""The one compute context of a training step: bf16 autocast, and the attention kernel choice on CPU.

Why the kernel choice: for our short sequences (65 image tokens, 32 text tokens) PyTorch's CPU
flash-attention *backward* is several times slower than the plain matmul + softmax ("math") kernel.
Profiled on the tiny config (benchmarks/bench_train.py --profile): the flash backward took a third of
the step; with the math kernel the whole step runs ~1.5x faster. Both are
``F.scaled_dot_product_attention``; only the backend differs. GPUs keep PyTorch's default choice.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class ComputeContext:
    """A reusable ``with`` context: ``with ctx: loss = model(batch)``."""

    def __init__(self, device: torch.device, precision: str):
        self.device = device
        self.precision = precision
        self._stack: ExitStack | None = None

    def __enter__(self) -> ComputeContext:
        self._stack = ExitStack()
        self._stack.enter_context(
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        )
        if self.device.type == "cpu":
            self._stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return self

    def __exit__(self, *exc) -> bool | None:
        stack, self._stack = self._stack, None
        return stack.__exit__(*exc)
