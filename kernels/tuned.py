"""Autotuned kernels whose launches skip Triton's per-call autotuning work once their signature is tuned.

On every launch, Triton's Autotuner and Heuristics wrappers rebuild dicts of all ~35 arguments to find the
tuning key and the heuristic values, and stringify each tensor's dtype: on the development CPU, 24-35 us
of host time a dense-forward launch with the GPU's twelve configs, where the JIT function's own entry took
2.4-4.5 us. Small layers are bound by host time (bench/NOTES.md). `@tuned` on top of `@triton.autotune`
sends the first launch of each signature through Triton's wrappers, which tune it (where the pruner keeps
one config, it is launched straight with that one: Triton 3.6 would time it); later launches of that
signature call the JIT function with the config and the heuristic values found then.

A signature is the values of the autotuning key's positional arguments, the dtype of every pointer
argument (those named *_ptr) and every keyword argument with its value (the launcher's constexprs).
The key, the config pruner and the heuristics must read nothing else besides the config: true of every
kernel here, which passes the arguments that vary call to call without changing the pick (row counts,
strides, tensors) positionally and names the rest. A grid is a tuple or a function of the config's
values (meta["BLOCK_M"]), as Triton's own grids here are.
"""
from __future__ import annotations

import threading
from operator import itemgetter

import torch
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import KernelInterface


class Tuned(KernelInterface):
    """An autotuned kernel: launch it as `kernel[grid](*args, **constexprs)`, as the Autotuner it wraps.

    .autotuner is Triton's Autotuner (its configs, best_config, configs_timings); .clear() forgets every
    tuned signature, so that the next launch of each tunes again.
    """

    def __init__(self, autotuner: Autotuner):
        self.autotuner = autotuner
        self.heuristics = {}  # name -> function of the arguments, outermost wrapper first, as Triton runs them
        fn = autotuner.fn
        while isinstance(fn, Heuristics):
            self.heuristics.update(fn.values)
            fn = fn.fn
        self.jit = fn
        names = autotuner.arg_names
        self._key_positions = tuple(names.index(name) for name in autotuner.keys)
        self._pointer_positions = tuple(i for i, name in enumerate(names) if name.endswith("_ptr"))
        self._plans: dict[tuple, dict] = {}  # signature -> the config's launch options and heuristic values
        self._lock = threading.Lock()
        self._getters: dict[int, tuple] = {}  # positional count -> (key values, pointers) of a launch's args

    def _make_getters(self, count: int) -> tuple:
        """Functions of a launch's positional args: the key values, and the pointers, each as a tuple."""
        getters = tuple(_tuple_getter([i for i in positions if i < count])
                        for positions in (self._key_positions, self._pointer_positions))
        self._getters[count] = getters
        return getters

    def run(self, *args, grid, warmup, **constexprs):
        if warmup:
            return self.autotuner.run(*args, grid=grid, warmup=warmup, **constexprs)
        getters = self._getters.get(len(args)) or self._make_getters(len(args))
        signature = (getters[0](args), tuple([pointer.dtype for pointer in getters[1](args)]),
                     tuple(constexprs.items()))
        plan = self._plans.get(signature)
        if plan is not None:
            return self._launch(args, grid, constexprs, plan)
        return self._first_launch(signature, args, grid, constexprs)

    def _launch(self, args: tuple, grid, constexprs: dict, plan: dict):
        """The kernel itself, with a plan's config (no autotuner)."""
        return self.jit.run(*args, grid=grid(plan) if callable(grid) else grid, warmup=False, **constexprs, **plan)

    def _first_launch(self, signature: tuple, args: tuple, grid, constexprs: dict):
        """Launch a signature not seen before, and keep its plan: through Triton's autotuner, which times the
        configs the pruner keeps, or straight with the config where the pruner keeps one (Triton 3.6's
        autotuner times even a lone config, a hundred-odd milliseconds of launches and syncs a signature,
        every signature under GPUNN_AUTOTUNE=0)."""
        self._check_signature(args, constexprs)
        # The plan is read from the autotuner's best_config, which another thread's launch could overwrite.
        with self._lock:
            lone = self._lone_config(args, constexprs)
            if lone is None:
                kernel = self.autotuner.run(*args, grid=grid, warmup=False, **constexprs)
                plan = self._plan(args, constexprs)
            else:
                self.autotuner.best_config, self.autotuner.configs_timings = lone, {}
                plan = self._plan(args, constexprs)
                kernel = self._launch(args, grid, constexprs, plan)
        # A NaN (a leaky_relu slope) never equals itself: its signature would never be found again.
        if all(value == value for value in constexprs.values()):
            self._plans[signature] = plan
        return kernel

    def _lone_config(self, args: tuple, constexprs: dict):
        """The config, where the pruner keeps exactly one of several (and it has no pre-hook); else None."""
        tuner = self.autotuner
        if len(tuner.configs) < 2:
            return None  # Triton's autotuner takes it untimed
        tuner.nargs = dict(zip(tuner.arg_names, args))
        try:
            kept = tuner.prune_configs(constexprs)
        finally:
            tuner.nargs = None
        return kept[0] if len(kept) == 1 and kept[0].pre_hook is None else None

    def _check_signature(self, args: tuple, constexprs: dict) -> None:
        """Refuse a launch whose signature would miss a tensor's dtype, or hold a tensor (never equal twice)."""
        names = self.autotuner.arg_names
        misplaced = [names[i] for i, arg in enumerate(args)
                     if isinstance(arg, torch.Tensor) and i not in self._pointer_positions]
        misplaced += [name for name, value in constexprs.items() if isinstance(value, torch.Tensor)]
        if misplaced:
            raise TypeError(f"{self.jit.__name__}: tensor arguments {misplaced} are not named *_ptr and passed "
                            f"positionally, so a launch signature would not see their dtype")

    def _plan(self, args: tuple, constexprs: dict) -> dict:
        """The launch options and heuristic values the wrappers just used for this signature."""
        names = self.autotuner.arg_names
        plan = self.autotuner.best_config.all_kwargs()
        named = {**dict(zip(names, args)), **constexprs, **plan}
        for name, heuristic in self.heuristics.items():
            named[name] = plan[name] = heuristic(named)
        return plan

    def clear(self) -> None:
        self._plans.clear()
        self.autotuner.cache.clear()


def _tuple_getter(positions: list[int]):
    """args -> the tuple of args at `positions` (operator.itemgetter, which returns a lone item bare)."""
    if len(positions) == 1:
        (position,) = positions
        return lambda args: (args[position],)
    return itemgetter(*positions) if positions else lambda args: ()


def tuned(autotuner: Autotuner) -> Tuned:
    """Decorator, above @triton.autotune: see the module docstring."""
    return Tuned(autotuner)
