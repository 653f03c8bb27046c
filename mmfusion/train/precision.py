"""The one compute context of a training step: bf16 autocast, and the attention kernel choice on CPU.

Why ``precision=auto`` (the default) and not always bf16: bf16 pays only where the hardware computes it. A CPU
without bf16 instructions (AVX2 only, no AVX512-BF16/AMX) emulates it: on such a 2-core AMD EPYC a 512x512 matmul
under bf16 autocast took 100x longer than in fp32, and one tiny training step 88 s instead of under one. So
``auto`` picks bf16 on GPUs that support it and, on CPUs, only where AMX tiles compute it, fp32 elsewhere.

Why AMX and not any native bf16: with AVX512-BF16 alone (a 2-core Xeon whose hypervisor hides AMX) oneDNN computes
bf16, but the casts around every op cost more than its dot products save at our widths. One tiny step there, fp32
against bf16 autocast (batch 128, optimizer included): contrastive 328 vs 401 ms, fused 766 vs 881 ms, width-256
fused 2135 vs 2745 ms. The depth-3 tiny of today, in samples/s (``python benchmarks/bench_branches.py --only tiny
tiny+fusion --precision fp32``, then ``bf16``): contrastive 357 vs 316, fused 182 vs 104. An earlier machine trained
the width-256 fused recipe at 154 samples/s under bf16, 2.6x the 60 of fp32 here; its AMX support was not recorded,
and no AMX machine was at hand to time the rule's other side.

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


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware rather than emulating it (many times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # oneDNN's own check (AVX512-BF16 or AMX); a private op, so absent means "unknown": stay in fp32
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 autocast makes training faster on ``device``: native bf16 on a GPU; AMX tiles on a CPU."""
    if device.type == "cpu":
        try:  # private, like the check above; absent means "unknown": stay in fp32
            amx = bool(torch.cpu._is_amx_tile_supported())
        except (AttributeError, RuntimeError):
            return False
        return amx and bf16_is_native(device)
    return bf16_is_native(device)


def resolve_precision(device: torch.device, precision: str) -> str:
    """``"auto"`` -> ``"bf16"`` where it speeds training up (:func:`bf16_pays`), else ``"fp32"``; other values
    pass through."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_pays(device) else "fp32"


class ComputeContext:
    """A reusable ``with`` context: ``with ctx: loss = model(batch)``."""

    def __init__(self, device: torch.device, precision: str):
        self.device = device
        self.precision = resolve_precision(device, precision)
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
