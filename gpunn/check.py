"""`python -m gpunn check`: gpunn's numerics on this machine, op by op, against a float64 torch reference.

For every op, dtype and case: the inputs are drawn at that dtype; gpunn's outputs (forward) and the
gradients of every input and parameter (backward, for one fixed random cotangent) are compared with the
same computation in torch on float64 copies of the same rounded inputs, as ||gpunn - ref|| / ||ref||
(the largest over the tensors; NaN or Inf fails). torch's own op at the same dtype is measured the same way
and shown beside it as the baseline: what the dtype itself costs. A check passes when gpunn's error is
within the dtype's tolerance and gpunn's Triton kernels ran in that direction (counted launches).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import functional, masks, reference
from .kernels.runtime import launch_counts, triton_runs_on
from .optim import SGD


@dataclass(frozen=True)
class Precision:
    """A dtype as checked: name, torch dtype, relative-error tolerance, whether fp32 matmuls may use TF32."""

    name: str
    dtype: torch.dtype
    tolerance: float
    tf32: bool = False


PRECISIONS = {p.name: p for p in (
    Precision("fp64", torch.float64, 1e-10),
    Precision("fp32", torch.float32, 1e-5),  # IEEE fp32, torch's default matmul precision
    Precision("tf32", torch.float32, 1e-3, tf32=True),  # fp32 tensors, TF32 tensor cores (CUDA only)
    Precision("fp16", torch.float16, 3e-3),
    Precision("bf16", torch.bfloat16, 1e-2),  # CUDA only: the interpreter widens bf16 to fp32
)}


def default_precisions(device: torch.device) -> list[str]:
    """The precisions checked where --dtypes is not given: all on a GPU; fp64, fp32 and fp16 on the CPU."""
    if device.type == "cuda":
        return list(PRECISIONS)
    return ["fp64", "fp32", "fp16"]


@dataclass
class Problem:
    """Inputs of one case at one dtype, and the op in gpunn and in torch, both f(*tensors) -> output(s).

    Floating tensors are cast to float64 for the reference; those marked in `differentiable` get gradients.
    """

    tensors: list[torch.Tensor]
    differentiable: list[bool]
    gpunn: Callable
    torch: Callable
    output: str = "forward"  # what the outputs are called in the table ("backward" is their gradients)


@dataclass(frozen=True)
class Case:
    op: str
    label: str
    build: Callable[[torch.dtype, torch.device, torch.Generator], Problem]
    quick: bool = False  # part of --quick


def _randn(gen, device, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# The cases: small, odd sizes (the interpreter runs them on a CPU in seconds).

def _linear(m, n, k, activation, lead=()):
    def build(dtype, device, gen):
        x = _randn(gen, device, dtype, *lead, m, k)
        w, b = _randn(gen, device, dtype, n, k, scale=k ** -0.5), _randn(gen, device, dtype, n, scale=k ** -0.5)
        return Problem([x, w, b], [True] * 3, lambda x, w, b: functional.linear(x, w, b, activation),
                       lambda x, w, b: reference.linear(x, w, b, activation))
    return build


def _masked(m, n, k, mask_fn, activation):
    def build(dtype, device, gen):
        mask = mask_fn(n, k).to(device)
        x = _randn(gen, device, dtype, m, k)
        w, b = _randn(gen, device, dtype, n, k, scale=0.3), _randn(gen, device, dtype, n, scale=0.3)
        return Problem([x, w, b], [True] * 3, lambda x, w, b: functional.masked_linear(x, w, mask, b, activation),
                       lambda x, w, b: reference.masked_linear(x, w, mask, b, activation))
    return build


def _local(x_shape, out_channels, kernel, stride, padding, dilation=1):
    """A locally connected layer over x_shape (N, C, L) or (N, C, H, W), one kernel/stride/padding/dilation for
    every dim; padding a number or "same" (stride 1)."""
    one_d = len(x_shape) == 3
    gpunn_fn, torch_fn = ((functional.locally_connected1d, reference.locally_connected1d) if one_d else
                          (functional.locally_connected2d, reference.locally_connected2d))
    n, c, *size = x_shape
    span = dilation * (kernel - 1)
    out_size = size if padding == "same" else [(length + 2 * padding - span - 1) // stride + 1 for length in size]
    fan_in = c * kernel ** len(size)

    def build(dtype, device, gen):
        x = _randn(gen, device, dtype, *x_shape)
        w = _randn(gen, device, dtype, out_channels, *out_size, c, *[kernel] * len(size), scale=fan_in ** -0.5)
        b = _randn(gen, device, dtype, out_channels, *out_size, scale=fan_in ** -0.5)
        return Problem([x, w, b], [True] * 3, lambda x, w, b: gpunn_fn(x, w, b, stride, padding, dilation),
                       lambda x, w, b: torch_fn(x, w, b, stride, padding, dilation))
    return build


def _rnn_cell(batch, inputs, hidden, nonlinearity):
    def build(dtype, device, gen):
        s = hidden ** -0.5
        shapes = [(batch, inputs, 1.0), (batch, hidden, 1.0), (hidden, inputs, s), (hidden, hidden, s), (hidden, s),
                  (hidden, s)]  # x, h, W_ih, W_hh, b_ih, b_hh (and each one's scale)
        tensors = [_randn(gen, device, dtype, *shape, scale=scale) for *shape, scale in shapes]
        return Problem(tensors, [True] * 6, lambda *t: functional.rnn_cell(*t, nonlinearity=nonlinearity),
                       lambda *t: reference.rnn_cell(*t, nonlinearity=nonlinearity))
    return build


def _rnn(steps, batch, inputs, hidden, layers, bidirectional, nonlinearity, batch_first=False):
    directions = 2 if bidirectional else 1

    def build(dtype, device, gen):
        s = hidden ** -0.5
        weights = []
        for layer in range(layers):
            for _ in range(directions):
                width = inputs if layer == 0 else directions * hidden
                weights += [_randn(gen, device, dtype, hidden, width, scale=s),
                            _randn(gen, device, dtype, hidden, hidden, scale=s),
                            _randn(gen, device, dtype, hidden, scale=s), _randn(gen, device, dtype, hidden, scale=s)]
        x = _randn(gen, device, dtype, *((batch, steps) if batch_first else (steps, batch)), inputs)
        h0 = _randn(gen, device, dtype, layers * directions, batch, hidden)
        options = dict(num_layers=layers, nonlinearity=nonlinearity, bidirectional=bidirectional,
                       batch_first=batch_first)
        return Problem([x, h0, *weights], [True] * (2 + len(weights)),
                       lambda x, h0, *w: functional.rnn(x, h0, list(w), **options),
                       lambda x, h0, *w: reference.rnn(x, h0, list(w), **options))
    return build


def _cross_entropy(shape, weighted, smoothing, reduction="mean"):
    def build(dtype, device, gen):
        classes = shape[1] if len(shape) > 1 else shape[0]
        logits = _randn(gen, device, dtype, *shape, scale=3.0)
        target = torch.randint(0, classes, shape[:1] + shape[2:], generator=gen).to(device)
        if target.dim():
            target[0] = -100  # an ignored row
        weight = torch.rand(classes, generator=gen, dtype=torch.float64).to(device, dtype) + 0.5
        options = dict(ignore_index=-100, reduction=reduction, label_smoothing=smoothing)
        w = (lambda w: w) if weighted else (lambda w: None)
        return Problem([logits, weight], [True, False],
                       lambda x, wt: functional.cross_entropy(x, target, w(wt), **options),
                       lambda x, wt: F.cross_entropy(x, target, w(wt), **options))
    return build


def _cross_entropy_probabilities(shape, weighted, smoothing, reduction="mean"):
    """Class-probability targets (a softmax of random scores), differentiated along with the logits."""
    def build(dtype, device, gen):
        classes = shape[1] if len(shape) > 1 else shape[0]
        logits = _randn(gen, device, dtype, *shape, scale=3.0)
        target = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), 1).to(device, dtype)
        weight = torch.rand(classes, generator=gen, dtype=torch.float64).to(device, dtype) + 0.5
        options = dict(reduction=reduction, label_smoothing=smoothing)
        w = (lambda w: w) if weighted else (lambda w: None)
        return Problem([logits, target, weight], [True, True, False],
                       lambda x, t, wt: functional.cross_entropy(x, t, w(wt), **options),
                       lambda x, t, wt: F.cross_entropy(x, t, w(wt), **options))
    return build


def _mse(shape, reduction):
    def build(dtype, device, gen):
        tensors = [_randn(gen, device, dtype, *shape), _randn(gen, device, dtype, *shape)]
        return Problem(tensors, [True, True], lambda x, t: functional.mse_loss(x, t, reduction=reduction),
                       lambda x, t: F.mse_loss(x, t, reduction=reduction))
    return build


def _double_backward(build_first_order):
    """A case's first-order gradients (of half its outputs' squared norm) as the outputs, made with
    create_graph=True: the check's backward of them is double backward through the op."""
    def build(dtype, device, gen):
        problem = build_first_order(dtype, device, gen)

        def gradients(fn):
            def run(*tensors):
                wanted = [t for t, grad in zip(tensors, problem.differentiable) if grad]
                with torch.backends.cudnn.flags(enabled=False):  # cuDNN's RNN backward is not differentiable
                    outputs = fn(*tensors)
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                return torch.autograd.grad(sum(o.pow(2).sum() for o in outputs) / 2, wanted, create_graph=True)
            return run
        return Problem(problem.tensors, problem.differentiable, gradients(problem.gpunn), gradients(problem.torch),
                       output="gradient")
    return build


def _sgd(shapes, steps, **options):
    """Parameters after `steps` SGD steps on given gradients (the optimizer's state carried between them)."""
    def run(optimizer_class, tensors):
        params = [torch.nn.Parameter(t.detach().clone()) for t in tensors[:len(shapes)]]
        optimizer = optimizer_class(params, lr=0.1, **options)
        grads = tensors[len(shapes):]
        for step in range(steps):
            for i, p in enumerate(params):
                p.grad = grads[step * len(shapes) + i].detach().clone()
            optimizer.step()
        return tuple(p.detach() for p in params)

    def build(dtype, device, gen):
        tensors = [_randn(gen, device, dtype, *s) for s in shapes]
        tensors += [_randn(gen, device, dtype, *s) for _ in range(steps) for s in shapes]
        return Problem(tensors, [False] * len(tensors), lambda *t: run(SGD, t),
                       lambda *t: run(lambda p, **kw: torch.optim.SGD(p, foreach=False, **kw), t), output="step")
    return build


CASES = [
    *[Case("linear", f"33x70x50 {act or 'none'}", _linear(33, 70, 50, act), quick=act in (None, "gelu"))
      for act in (None, "relu", "leaky_relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "silu")],
    Case("linear", "(2, 5, 130) -> 7 relu", _linear(5, 7, 130, "relu", lead=(2,))),
    Case("linear", "1x1x1", _linear(1, 1, 1, None)),
    # Many rows into a small weight: the weight gradient splits its rows (and sums the splits in a second launch).
    Case("linear", "2100x10x20 tanh", _linear(2100, 10, 20, "tanh")),
    Case("masked_linear", "33x70x50 band of 9, relu", _masked(33, 70, 50, lambda n, k: masks.local_1d(k, n, 9), "relu"),
         quick=True),
    Case("masked_linear", "20x40x70 10% random, gelu",
         _masked(20, 40, 70, lambda n, k: masks.random(k, n, 0.1, generator=torch.Generator().manual_seed(0)), "gelu")),
    # Full, partial and empty blocks at every block size; under the interpreter, two tiles of rows.
    Case("masked_linear", "70x150x150 lower triangle, silu",
         _masked(70, 150, 150, lambda n, k: torch.ones(n, k, dtype=torch.bool).tril(), "silu")),
    Case("locally_connected2d", "(2, 3, 9, 7) -> 5 ch, 3x3, stride 2, pad 1", _local((2, 3, 9, 7), 5, 3, 2, 1),
         quick=True),
    Case("locally_connected2d", "(1, 2, 6, 5) -> 3 ch, 2x2", _local((1, 2, 6, 5), 3, 2, 1, 0)),
    Case("locally_connected2d", "(2, 2, 7, 6) -> 3 ch, 3x3, dilation 2, same",
         _local((2, 2, 7, 6), 3, 3, 1, "same", 2)),
    Case("locally_connected1d", "(2, 3, 13) -> 4 ch, k3, dilation 3, pad 1", _local((2, 3, 13), 4, 3, 1, 1, 3)),
    # An even window, "same": one more zero after the last input than before the first.
    Case("locally_connected1d", "(2, 3, 11) -> 4 ch, k4, same", _local((2, 3, 11), 4, 4, 1, "same")),
    Case("locally_connected1d", "(3, 4, 17) -> 6 ch, k5, stride 2, pad 2", _local((3, 4, 17), 6, 5, 2, 2), quick=True),
    Case("rnn_cell", "5 x (7 -> 13) tanh", _rnn_cell(5, 7, 13, "tanh"), quick=True),
    Case("rnn_cell", "3 x (33 -> 9) relu", _rnn_cell(3, 33, 9, "relu")),
    Case("rnn", "6 steps, 3 x (5 -> 9), 2 layers, bidirectional, tanh", _rnn(6, 3, 5, 9, 2, True, "tanh"), quick=True),
    Case("rnn", "11 steps, 2 x (4 -> 17), relu, batch_first", _rnn(11, 2, 4, 17, 1, False, "relu", batch_first=True)),
    Case("cross_entropy", "37x50, class weights, smoothing 0.1", _cross_entropy((37, 50), True, 0.1), quick=True),
    Case("cross_entropy", "(4, 7, 3) sum", _cross_entropy((4, 7, 3), False, 0.0, "sum")),
    Case("cross_entropy", "37x50 class probabilities, class weights, smoothing 0.1",
         _cross_entropy_probabilities((37, 50), True, 0.1)),
    Case("cross_entropy", "(4, 7, 3) class probabilities, none", _cross_entropy_probabilities((4, 7, 3), False, 0.0,
                                                                                                "none")),
    Case("mse_loss", "33x17 mean", _mse((33, 17), "mean"), quick=True),
    Case("mse_loss", "(5, 130) none", _mse((5, 130), "none")),
    Case("double_backward", "linear 33x70x50 gelu", _double_backward(_linear(33, 70, 50, "gelu")), quick=True),
    Case("double_backward", "linear (2, 5, 130) -> 7 tanh", _double_backward(_linear(5, 7, 130, "tanh", lead=(2,)))),
    Case("double_backward", "cross_entropy 37x50, class weights, smoothing 0.1",
         _double_backward(_cross_entropy((37, 50), True, 0.1)), quick=True),
    Case("double_backward", "cross_entropy 37x50 class probabilities, class weights",
         _double_backward(_cross_entropy_probabilities((37, 50), True, 0.0))),
    Case("double_backward", "masked_linear 33x70x50 band of 9, tanh",
         _double_backward(_masked(33, 70, 50, lambda n, k: masks.local_1d(k, n, 9), "tanh")), quick=True),
    Case("double_backward", "locally_connected2d (2, 3, 9, 7) -> 5 ch, 3x3, stride 2, pad 1",
         _double_backward(_local((2, 3, 9, 7), 5, 3, 2, 1))),
    Case("double_backward", "rnn_cell 5 x (7 -> 13) tanh", _double_backward(_rnn_cell(5, 7, 13, "tanh"))),
    Case("double_backward", "rnn 4 steps, 3 x (5 -> 9), bidirectional, tanh",
         _double_backward(_rnn(4, 3, 5, 9, 1, True, "tanh"))),
    Case("double_backward", "mse_loss 33x17 mean", _double_backward(_mse((33, 17), "mean"))),
    Case("sgd", "3 tensors, 3 steps, momentum 0.9, nesterov, weight decay",
         _sgd([(33, 7), (130,), (1,)], 3, momentum=0.9, nesterov=True, weight_decay=0.01), quick=True),
    Case("sgd", "2 tensors, 2 steps, plain", _sgd([(70, 50), (3,)], 2)),
]
OPS = tuple(dict.fromkeys(case.op for case in CASES))


# ----------------------------------------------------------------------------------------------------
# Running

@dataclass
class Result:
    op: str
    case: str
    precision: str
    direction: str  # "forward" (or "step" for an optimizer) or "backward"
    gpunn_err: float
    torch_err: float | None  # None where torch's op does not run at this dtype on this device
    tolerance: float
    launches: int  # gpunn's Triton launches in this direction (0: it did not run on the Triton path)
    error: str | None = None  # what gpunn raised, where it raised

    @property
    def passed(self) -> bool:
        return (self.error is None and math.isfinite(self.gpunn_err) and self.gpunn_err <= self.tolerance
                and self.launches > 0)


def rel_err(outs, refs) -> float:
    """max over tensors (or of one tensor) of ||out - ref|| / ||ref|| in float64; NaN or Inf anywhere, or a
    shape that differs, gives inf."""
    if isinstance(outs, torch.Tensor):
        outs, refs = (outs,), (refs,)
    worst = 0.0
    for out, ref in zip(outs, refs, strict=True):
        if out.shape != ref.shape:
            return math.inf
        diff = (out.detach().to(torch.float64) - ref.detach()).norm().item()
        scale = ref.norm().item()
        err = diff / scale if scale > 0 else diff
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err)
    return worst


@contextlib.contextmanager
def _fp32_precision(tf32: bool):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _launches() -> int:
    return sum(launch_counts().values())


def evaluate(fn: Callable, problem: Problem, dtype: torch.dtype | None, cotangent_gen_seed: int):
    """fn on copies of the problem's tensors (cast to `dtype` when given): ((outputs, gradients of the
    differentiable inputs for a fixed random cotangent), (Triton launches of the forward, of the backward))."""
    leaves = [(t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().clone()
              .requires_grad_(grad) for t, grad in zip(problem.tensors, problem.differentiable)]
    start = _launches()
    with torch.enable_grad():
        outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    forward = _launches() - start
    wanted = [leaf for leaf, grad in zip(leaves, problem.differentiable) if grad]
    if not wanted:
        return (tuple(o.detach() for o in outs), ()), (forward, 0)
    gen = torch.Generator().manual_seed(cotangent_gen_seed)
    cotangents = [torch.randn(out.shape, generator=gen, dtype=torch.float64).to(problem.tensors[0].dtype)
                  .to(device=out.device, dtype=out.dtype) for out in outs]
    start = _launches()
    grads = torch.autograd.grad(outs, wanted, cotangents)
    return (tuple(o.detach() for o in outs), grads), (forward, _launches() - start)


def check_case(case: Case, precision: Precision, device: torch.device, seed: int) -> list[Result]:
    """Forward and backward results of one case at one precision."""
    gen = torch.Generator().manual_seed(seed)
    problem = case.build(precision.dtype, device, gen)
    with _fp32_precision(precision.tf32):
        try:
            ours, launches = evaluate(problem.gpunn, problem, None, seed)
        except Exception as error:  # noqa: BLE001 - a failing check, not the end of the run
            return [Result(case.op, case.label, precision.name, "forward and backward", math.inf, None,
                           precision.tolerance, 0, f"{type(error).__name__}: {_first_line(error)}")]
        try:
            theirs, _ = evaluate(problem.torch, problem, None, seed)
        except RuntimeError:  # torch has no kernel for this dtype on this device (a CPU half op, say)
            theirs = None
    ref, _ = evaluate(problem.torch, problem, torch.float64, seed)
    results = []
    for index, direction in enumerate((problem.output, "backward")):
        if not ref[index]:
            continue
        torch_err = rel_err(theirs[index], ref[index]) if theirs is not None else None
        results.append(Result(case.op, case.label, precision.name, direction, rel_err(ours[index], ref[index]),
                              torch_err, precision.tolerance, launches[index]))
    return results


def _first_line(error: Exception) -> str:
    """An exception's message as one table cell: its first line, without column bars, at most 200 characters."""
    lines = str(error).splitlines()
    return (lines[0] if lines else "").replace("|", "/")[:200]


def run(device: torch.device, quick: bool = False, ops: list[str] | None = None,
        precisions: list[str] | None = None, seed: int = 0, log: Callable[[str], None] = print) -> list[Result]:
    """Every selected case at every selected precision; logs one line per case as it finishes."""
    cases = [c for c in CASES if (not quick or c.quick) and (ops is None or c.op in ops)]
    precisions = precisions or default_precisions(device)
    results = []
    total = len(cases) * len(precisions)
    for i, (case, name) in enumerate(((c, p) for p in precisions for c in cases), 1):
        start = time.perf_counter()
        # Each case's inputs follow from the seed, the case and the precision, not from what else was selected.
        case_seed = seed + CASES.index(case) * len(PRECISIONS) + list(PRECISIONS).index(name)
        new = check_case(case, PRECISIONS[name], device, case_seed)
        results += new
        verdict = "ok" if all(r.passed for r in new) else "FAIL"
        log(f"[{i}/{total}] {name} {case.op} {case.label}: {verdict} ({time.perf_counter() - start:.1f}s)")
    return results


def table(results: list[Result]) -> str:
    """A markdown table: one row per (op, case, precision, direction)."""
    lines = ["| op | case | dtype | direction | gpunn rel err | torch rel err (same dtype) | tolerance | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        torch_err = "n/a" if r.torch_err is None else f"{r.torch_err:.2e}"
        verdict = ("ok" if r.passed else f"FAIL: raised {r.error}" if r.error else
                   "FAIL: no Triton launch" if r.launches == 0 else "FAIL")
        lines.append(f"| {r.op} | {r.case} | {r.precision} | {r.direction} | {r.gpunn_err:.2e} | {torch_err} "
                     f"| {r.tolerance:.0e} | {verdict} |")
    return "\n".join(lines)


def main(device: str | torch.device | None, quick: bool, ops: list[str] | None, precisions: list[str] | None, seed: int,
         out: str | None) -> int:
    """The `gpunn check` command: exit status 0 when every check passed, 1 otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not triton_runs_on(device):
        print(f"error: gpunn's Triton kernels do not run on {device} in this process (a CPU needs TRITON_INTERPRET=1 "
              f"set before triton is imported; `python -m gpunn` sets it when there is no GPU)", file=sys.stderr)
        return 2
    for name in precisions or []:
        if name in ("tf32", "bf16") and device.type != "cuda":
            print(f"error: {name} is checked on CUDA only (on the CPU the interpreter computes it in fp32)",
                  file=sys.stderr)
            return 2
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"gpunn check on {where}; torch {torch.__version__}; {'quick' if quick else 'all'} cases")
    start = time.perf_counter()
    results = run(device, quick, ops, precisions, seed)
    text = table(results)
    failed = [r for r in results if not r.passed]
    summary = (f"{len(results)} checks in {time.perf_counter() - start:.0f} s: "
               f"{len(results) - len(failed)} passed, {len(failed)} failed")
    print()
    print(text)
    print()
    print(summary)
    if out:
        with open(out, "w") as handle:
            handle.write(f"# gpunn check on {where}\n\ntorch {torch.__version__}\n\n{text}\n\n{summary}\n")
        print(f"wrote {out}")
    return 1 if failed else 0
