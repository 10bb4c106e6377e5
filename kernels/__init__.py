"""gpunn's Triton kernels and their host launchers (installed as gpunn.kernels).

No nn.Module and no autograd here: launchers take tensors, choose grids and configs, and launch.
"""
from . import activations, dense, layout, local, masked, rnn
from .runtime import INTERPRET, Rows, block_counts, launch_counts, triton_runs_on

__all__ = ["INTERPRET", "Rows", "activations", "block_counts", "dense", "layout", "launch_counts", "local", "masked",
           "rnn", "triton_runs_on"]
