"""`python -m gpunn` and the `gpunn` console script."""
from __future__ import annotations

import os
import sys


def _choose_backend() -> None:
    """With no CUDA device, run gpunn's Triton kernels through Triton's interpreter on the CPU.

    Triton reads TRITON_INTERPRET when it is first imported, so this runs before anything imports it;
    an explicit TRITON_INTERPRET in the environment wins.
    """
    if "triton" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv: list[str] | None = None) -> int:
    _choose_backend()
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
