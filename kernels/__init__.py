"""gpunn's Triton kernels and their host launchers (installed as gpunn.kernels).

No nn.Module and no autograd here: launchers take tensors, choose grids and configs, and launch.
"""
from . import activations, dense
from .runtime import INTERPRET, Rows, launch_counts, triton_runs_on

__all__ = ["INTERPRET", "Rows", "activations", "dense", "launch_counts", "triton_runs_on"]
