"""Benchmark of the 1-D locally connected layer (op local1d: gpunn.functional.locally_connected1d).

bench/local.py's cases, providers, work model and peak-memory ratio over one spatial dim: x (N, C, L), the
weight (O, OL, C, K), the bias (O, OL); torch = gpunn.reference.locally_connected1d (F.unfold + einsum over a
height of 1) and its torch.compile.
"""
from __future__ import annotations

from . import local

OP = "local1d"

# (N, C, O, (L,), kernel, padding) per preset: "fwd" runs the forward mode, "grad" runs bwd and fwd+bwd.
PRESETS = {
    "smoke": {"fwd": [(3, 2, 5, (7,), 3, 1), (5, 7, 3, (9,), 5, 0)], "grad": [(3, 2, 5, (7,), 3, 1)]},
    # The target: batch 64, 64 channels in and out, length 1024, a window of 9, padding 4.
    "quick": {"fwd": [(64, 64, 64, (1024,), 9, 4)], "grad": [(64, 64, 64, (1024,), 9, 4)]},
    "full": {"fwd": [(64, 64, 64, (1024,), 9, 4), (256, 64, 64, (1024,), 9, 4), (32, 16, 32, (4096,), 33, 16)],
             "grad": [(64, 64, 64, (1024,), 9, 4), (256, 64, 64, (1024,), 9, 4)]},
}

NOTES = [
    "local1d: torch = gpunn.reference.locally_connected1d (F.unfold + einsum over a height of 1); gpunn = "
    "gpunn.functional.locally_connected1d; FLOPs, bytes and peak_mem_ratio as local2d with L = OL, R = C K.",
]


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[local.Case]:
    """Every case of a preset, ordered by dtype, then forward before gradient shapes (activations ignored)."""
    return local.cases(preset, dtypes, activations, PRESETS)


steps, run = local.steps, local.run
