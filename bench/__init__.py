"""gpunn benchmarks (python -m bench), the ahead-of-time compile report and the GPU device check."""
