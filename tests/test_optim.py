"""gpunn.optim.SGD against torch.optim.SGD: several steps for each hyper-parameter, in float64 (and the
lower precisions), param groups, state_dict both ways, one launch per group and dtype."""
from __future__ import annotations

import itertools
import re

import pytest
import torch
from helpers import assert_close, count_launches, dtypes_for

import gpunn

SETTINGS = [dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
            for m, d, wd, n, mx in itertools.product((0.0, 0.9), (0.0, 0.3), (0.0, 0.05), (False, True),
                                                     (False, True))
            if not (n and (m == 0 or d != 0))]


def _params(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 11), (11,), (1,), (5000,), (3, 4, 5)]
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype) for shape in shapes]


def _run(optimizer_class, params, grads_per_step, lrs=None, **settings):
    params = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = optimizer_class(params, lr=0.1, **settings)
    for step, grads in enumerate(grads_per_step):
        if lrs is not None:
            optimizer.param_groups[0]["lr"] = lrs[step]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        optimizer.step()
    return params, optimizer


def _more_steps(params, optimizer, grads_per_step):
    """Steps of an optimizer already built over params, one per list of gradients."""
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()


def _grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype) for p in params]
            for _ in range(steps)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_matches_torch_over_steps(device, settings):
    params = _params(device, torch.float64)
    grads = _grads(params, 3)
    with count_launches() as launches:
        ours, _ = _run(gpunn.optim.SGD, params, grads, **settings)
    assert launches == {"sgd_kernel": 3}, launches  # every setting steps in the kernel, one launch a step
    ref, _ = _run(torch.optim.SGD, params, grads, **settings)
    for p, r in zip(ours, ref):
        assert_close(p.detach(), r.detach(), torch.float64, str(settings))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_dtypes(device, dtype):
    if dtype not in dtypes_for(device):
        pytest.skip("bfloat16 is checked on a GPU only")
    params = _params(device, dtype)
    grads = _grads(params, 3)
    settings = dict(momentum=0.9, dampening=0.1, weight_decay=0.01)
    with count_launches() as launches:
        ours, _ = _run(gpunn.optim.SGD, params, grads, **settings)
    assert launches == {"sgd_kernel": 3}, launches
    ref, _ = _run(torch.optim.SGD, [p.double() for p in params], [[g.double() for g in s] for s in grads], **settings)
    for p, r in zip(ours, ref):
        assert p.dtype == dtype
        assert_close(p.detach(), r.detach(), dtype, "param")


def test_one_launch_per_group_and_dtype_and_lr_changes_recompile_nothing(device):
    params = _params(device, torch.float64) + _params(device, torch.float32)
    grads = _grads(params, 4)
    with count_launches() as launches:
        ours, _ = _run(gpunn.optim.SGD, params, grads, lrs=[0.1, 0.05, 0.02, 0.01], momentum=0.5)
    assert launches == {"sgd_kernel": 2 * 4}
    ref, _ = _run(torch.optim.SGD, params, grads, lrs=[0.1, 0.05, 0.02, 0.01], momentum=0.5)
    for p, r in zip(ours, ref):
        assert_close(p.detach(), r.detach(), p.dtype, "param")


def test_the_step_table_is_built_once_for_a_training_loop(device):
    """Steps over the same tensors (gradients kept in place, as zero_grad(set_to_none=False) and CUDA graphs
    keep them) reuse the optimizer's table on the device; a new learning rate rewrites its header in place;
    gradients that moved get a new table; results follow torch throughout."""
    params = [torch.nn.Parameter(p) for p in _params(device, torch.float32)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = gpunn.optim.SGD(params, lr=0.1, momentum=0.9), torch.optim.SGD(twins, lr=0.1, momentum=0.9)
    tables = []
    for step in range(6):
        if step == 3:
            for optimizer in (ours, theirs):
                optimizer.param_groups[0]["lr"] = 0.05
        for p, q in zip(params, twins):
            if p.grad is None or step == 5:  # new gradient tensors at the first and the last step
                p.grad = torch.empty_like(p)
            p.grad.normal_()
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
        (steady,) = [table for (_, _, _, first), (_, _, table) in ours._tables.items() if not first] or [None]
        tables.append(steady)
    # Step 1 makes the buffers (a slot of its own); steps 2-5 share one table, step 6's gradients moved.
    assert tables[0] is None and tables[1] is tables[2] is tables[3] is tables[4] and tables[5] is not tables[4]
    assert len(ours._tables) == 2
    for p, q in zip(params, twins):
        assert_close(p.detach(), q.detach(), torch.float32, "param")


def test_a_tensor_learning_rate_is_read_on_the_device(device, monkeypatch):
    """A learning rate given as a tensor on the parameters' device is read by the kernel, never on the host
    (no sync, and a CUDA graph's replays follow it): a scheduler filling it in place, as torch's schedulers
    do, steers every step while the table is built once; results follow torch's SGD on the same schedule."""
    params = [torch.nn.Parameter(p) for p in _params(device, torch.float32)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr = torch.tensor(0.1, device=device)
    ours = gpunn.optim.SGD(params, lr=lr, momentum=0.9)
    theirs = torch.optim.SGD(twins, lr=torch.tensor(0.1), momentum=0.9)
    schedules = [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) for optimizer in (ours, theirs)]

    def read_on_the_host(*args):
        raise AssertionError("the learning rate was read on the host")

    tables = set()
    for grads in _grads(params, 4):
        for p, q, g in zip(params, twins, grads):
            p.grad = g.clone() if p.grad is None else p.grad.copy_(g)  # kept in place, as a captured step needs
            q.grad = g.clone()
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "__float__", read_on_the_host)
            patch.setattr(torch.Tensor, "item", read_on_the_host)
            ours.step()
        theirs.step()
        for schedule in schedules:
            schedule.step()
        tables.add(id(ours._tables[0, params[0].device, torch.float32, False][2]) if len(ours._tables) > 1 else None)
    assert ours.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.1 * 0.5**4)
    assert len(tables) == 2  # none before the buffers exist, then one table for every later step
    for p, q in zip(params, twins):
        assert_close(p.detach(), q.detach(), torch.float32, "param")
    # Back to a number, 0 (the value the table's header held while the rate came from the device): no update.
    before = [p.detach().clone() for p in params]
    ours.param_groups[0]["lr"] = 0.0
    ours.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_param_groups_missing_grads_and_non_contiguous_params(device):
    base = _params(device, torch.float64)
    odd = torch.randn(6, 4, dtype=torch.float64, device=device).t()  # non-contiguous: torch's path

    def build(optimizer_class):
        ps = [torch.nn.Parameter(p.clone()) for p in base] + [torch.nn.Parameter(odd.clone())]
        groups = [{"params": ps[:2], "lr": 0.3, "momentum": 0.9}, {"params": ps[2:], "weight_decay": 0.1}]
        return ps, optimizer_class(groups, lr=0.05, nesterov=False)

    ours, our_opt = build(gpunn.optim.SGD)
    ref, ref_opt = build(torch.optim.SGD)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        for i, (p, r) in enumerate(zip(ours, ref)):
            g = None if (i + step) % 3 == 0 else torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device)
            p.grad = None if g is None else g.clone()
            r.grad = None if g is None else g.clone()
        our_opt.step()
        ref_opt.step()
    assert not ours[-1].is_contiguous()
    for p, r in zip(ours, ref):
        assert_close(p.detach(), r.detach(), torch.float64, "param")


def test_state_dict_loads_both_ways(device):
    params = _params(device, torch.float64)
    grads = _grads(params, 4)
    settings = dict(momentum=0.8, dampening=0.2, weight_decay=0.01)
    for first, second in ((torch.optim.SGD, gpunn.optim.SGD), (gpunn.optim.SGD, torch.optim.SGD)):
        half, opt = _run(first, params, grads[:2], **settings)
        state = opt.state_dict()
        resumed = [torch.nn.Parameter(p.detach().clone()) for p in half]
        opt2 = second(resumed, lr=0.1, **settings)
        opt2.load_state_dict(state)
        _more_steps(resumed, opt2, grads[2:])
        straight, straight_opt = _run(torch.optim.SGD, params, grads, **settings)
        for p, r in zip(resumed, straight):
            assert_close(p.detach(), r.detach(), torch.float64, f"{first.__module__} -> {second.__module__}")
        assert opt2.state_dict()["state"].keys() == straight_opt.state_dict()["state"].keys()


def test_closure_and_validation_errors(device):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64, device=device))
    opt = gpunn.optim.SGD([p], lr=0.5)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    assert_close(p.detach(), torch.zeros(3, dtype=torch.float64), torch.float64, "after one step")
    for kwargs in (dict(lr=-1.0), dict(lr=0.1, momentum=-0.5), dict(lr=0.1, weight_decay=-1.0),
                   dict(lr=0.1, nesterov=True)):
        with pytest.raises(ValueError):
            torch.optim.SGD([p], **kwargs)
        with pytest.raises(ValueError):
            gpunn.optim.SGD([p], **kwargs)


@pytest.mark.parametrize("settings", [dict(momentum=0.0), dict(momentum=0.9, weight_decay=0.05, nesterov=True)],
                         ids=str)
def test_complex_parameters_update_as_their_real_view(device, settings):
    params = [torch.complex(*torch.randn(2, 7, 3, dtype=torch.float64)).to(device)]
    grads = [[torch.complex(*torch.randn(2, 7, 3, dtype=torch.float64)).to(device)] for _ in range(3)]
    with count_launches() as launches:
        ours, optimizer = _run(gpunn.optim.SGD, params, grads, **settings)
    assert launches == {"sgd_kernel": 3}
    theirs, reference = _run(torch.optim.SGD, params, grads, **settings)
    assert_close(torch.view_as_real(ours[0]), torch.view_as_real(theirs[0]), torch.float64, "complex param")
    if settings["momentum"]:
        assert optimizer.state[ours[0]]["momentum_buffer"].dtype == torch.complex128


def test_gradient_of_another_dtype_than_its_parameter_takes_torch_sgd(device):
    # A parameter with grad_dtype = None may hold a gradient of another dtype: the kernels read one dtype, so
    # torch's SGD updates it (buffer in the gradient's dtype, as torch keeps it).
    results = []
    for optimizer_class in (gpunn.optim.SGD, torch.optim.SGD):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 9, dtype=torch.float64, device=device))
        p.grad_dtype = None
        optimizer = optimizer_class([p], lr=0.1, momentum=0.9)
        for step in range(2):
            p.grad = torch.arange(9, dtype=torch.float32, device=device) * (step + 1)
            optimizer.step()
        results.append((p.detach(), optimizer.state[p]["momentum_buffer"]))
    (ours, our_buffer), (theirs, their_buffer) = results
    assert_close(ours, theirs, torch.float64, "param")
    assert our_buffer.dtype == their_buffer.dtype == torch.float32


def test_foreach_fused_and_differentiable_arguments(device):
    p = torch.nn.Parameter(torch.randn(4, device=device))
    for kwargs in (dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)):
        ours, theirs = gpunn.optim.SGD([p], lr=0.1, **kwargs), torch.optim.SGD([p], lr=0.1, **kwargs)
        assert ours.param_groups[0].keys() == theirs.param_groups[0].keys()
        assert all(ours.param_groups[0][key] == theirs.param_groups[0][key] for key in kwargs)
        assert not ours._step_supports_amp_scaling  # a GradScaler unscales before step
    with pytest.raises(NotImplementedError, match="differentiable"):
        gpunn.optim.SGD([p], lr=0.1, differentiable=True)
    # What torch refuses first, it refuses for gpunn too, with its own error.
    for kwargs in (dict(fused=True, differentiable=True), dict(fused=True, foreach=True),
                   dict(lr=-1.0, differentiable=True)):
        kwargs = dict(lr=0.1) | kwargs
        with pytest.raises(Exception) as theirs:
            torch.optim.SGD([p], **kwargs)
        with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
            gpunn.optim.SGD([p], **kwargs)


@pytest.mark.parametrize("copy_kind", ["deepcopy", "torch.save"])
def test_a_copied_or_pickled_optimizer_steps_on(device, copy_kind):
    """copy.deepcopy and pickling keep what Optimizer.__getstate__ keeps (not the kernel tables): the copy
    rebuilds them and goes on as torch's would."""
    import copy
    import io

    params = _params(device, torch.float64)
    grads = _grads(params, 4)
    settings = dict(momentum=0.9, weight_decay=0.01)
    half, optimizer = _run(gpunn.optim.SGD, params, grads[:2], **settings)
    if copy_kind == "deepcopy":
        half, optimizer = copy.deepcopy((half, optimizer))
    else:
        buffer = io.BytesIO()
        torch.save((half, optimizer), buffer)
        buffer.seek(0)
        half, optimizer = torch.load(buffer, weights_only=False)
    _more_steps(half, optimizer, grads[2:])
    straight, _ = _run(torch.optim.SGD, params, grads, **settings)
    for p, r in zip(half, straight):
        assert_close(p.detach(), r.detach(), torch.float64, copy_kind)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_step_marks_its_parameters_modified_as_torch(device, momentum):
    """The kernel writes parameters through pointers: their version counters still move, so a graph that saved
    a parameter before the step refuses its backward as torch's does (it had run on the updated weights), and
    allow_mutation_on_saved_tensors gives the gradient at the saved values."""
    torch.manual_seed(0)
    layer = gpunn.Linear(3, 2, activation="gelu").to(device=device, dtype=torch.float64)
    x = torch.randn(4, 3, device=device, dtype=torch.float64, requires_grad=True)
    optimizer = gpunn.optim.SGD(layer.parameters(), lr=1.0, momentum=momentum)
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    y = layer(x)
    versions = [p._version for p in layer.parameters()]
    with count_launches() as launches:
        optimizer.step()
    assert launches == {"sgd_kernel": 1}
    assert all(p._version > v for p, v in zip(layer.parameters(), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        expected = torch.autograd.grad(layer(x).sum(), x)[0]
        y = layer(x)
        for p in layer.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        assert_close(torch.autograd.grad(y.sum(), x)[0], expected, torch.float64, "grad at the saved weights")


def _misaligned(values: list[float]) -> torch.Tensor:
    """A float64 CPU tensor at an address 4 bytes off a multiple of 8 (frombuffer at an odd offset, as from a
    file's bytes): torch's ops take it; an element offset from another tensor's address does not exist."""
    tensor = torch.frombuffer(bytearray(4 + 8 * len(values)), dtype=torch.float64, offset=4, count=len(values))
    return tensor.copy_(torch.tensor(values, dtype=torch.float64))


def _negated_gradient(p: torch.Tensor) -> None:
    """p.grad as autograd leaves it through a conjugate: a contiguous lazily negated view (is_neg)."""
    z = torch.complex(torch.zeros_like(p), p)
    (z.conj() * torch.tensor(0.5 + 1j, dtype=torch.complex128, device=p.device)).real.sum().backward()
    assert p.grad.is_neg()


def _unusual_case(name: str, device) -> tuple[list[torch.Tensor], dict, object]:
    """(params with their gradients, SGD's arguments, what to do to the optimizer before the step, or None) for
    a parameter the kernel must not step itself."""
    plain = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64, device=device))
    plain.grad = torch.linspace(2, 3, 5, dtype=torch.float64, device=device)
    if name == "misaligned parameter":
        p = torch.nn.Parameter(_misaligned([1.0, 2.0, 3.0, 4.0]))
        p.grad = torch.ones(4, dtype=torch.float64)
        return [plain, p], dict(lr=0.5, momentum=0.9), None
    if name == "misaligned gradient":
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        p.grad = _misaligned([1.0, -2.0, 3.0, 0.5])
        return [plain, p], dict(lr=0.5), None
    if name == "negated gradient":
        p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64, device=device))
        _negated_gradient(p)
        return [plain, p], dict(lr=0.1, momentum=0.9), None
    if name == "conjugated complex gradient":
        p = torch.nn.Parameter(torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex128, device=device))
        p.grad = torch.tensor([0.5 + 1j, -2 + 0.25j], dtype=torch.complex128, device=device).conj()
        assert p.grad.is_conj()
        return [plain, p], dict(lr=0.1), None
    if name == "tensor subclass":
        from torch.testing._internal.two_tensor import TwoTensor
        p = torch.nn.Parameter(TwoTensor(torch.arange(4.0, device=device), torch.arange(4.0, device=device) * 2))
        p.grad = TwoTensor(torch.ones(4, device=device), torch.ones(4, device=device))
        return [p], dict(lr=0.5), None
    if name == "integer parameter":  # an int lr steps it (a float one is refused, as by torch)
        p = torch.tensor([2 ** 30 + 100, 5], device=device)
        p.grad = torch.tensor([1, 2], device=device)
        return [p], dict(lr=1, momentum=0.9), None
    if name == "inference parameter":  # stepped outside inference_mode: torch refuses the in-place update
        with torch.inference_mode():
            p = torch.ones(3, dtype=torch.float64, device=device)
        p.grad = torch.ones(3, dtype=torch.float64, device=device)
        return [plain, p], dict(lr=0.5), None
    if name == "listed twice":  # torch updates it twice, one update after the other
        return [plain, plain], dict(lr=0.5, momentum=0.9), None
    p = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float64, device=device))
    p.grad = torch.ones(3, 4, dtype=torch.float64, device=device)
    if name == "inference momentum buffer":  # made by a step under inference_mode, then stepped outside it
        def prepare(optimizer):
            with torch.inference_mode():
                optimizer.step()
        return [p], dict(lr=0.1, momentum=0.9), prepare
    # A buffer set by hand (load_state_dict checks no shape): torch's step raises.
    buffer = (torch.zeros(2, dtype=torch.float64, device=device) if name == "momentum buffer of another shape"
              else torch.zeros(3, 4, dtype=torch.float64, device="meta"))
    assert name in ("momentum buffer of another shape", "momentum buffer on another device")
    return [p], dict(lr=0.1, momentum=0.9), lambda optimizer: optimizer.state[p].update(momentum_buffer=buffer)


UNUSUAL = ["misaligned parameter", "misaligned gradient", "negated gradient", "conjugated complex gradient",
           "tensor subclass", "integer parameter", "inference parameter", "listed twice",
           "momentum buffer of another shape", "momentum buffer on another device",
           "inference momentum buffer"]


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("name", UNUSUAL)
def test_what_the_kernel_cannot_step_takes_torch_sgd(device, name):
    """Tensors the kernel would read wrongly (misaligned, lazily negated or conjugated, a dispatching
    subclass), parameters it must not write (integer, inference) or not in one launch (listed twice), and
    momentum buffers it cannot take (another shape or device, an inference tensor): torch's SGD steps them, or
    raises its error, as it does alone."""
    if name.startswith("misaligned") and device.type != "cpu":
        pytest.skip("a misaligned tensor is made from host bytes")
    outcomes = []
    for optimizer_class in (gpunn.optim.SGD, torch.optim.SGD):
        params, arguments, prepare = _unusual_case(name, device)
        optimizer = optimizer_class(params, **arguments)
        if prepare is not None:
            prepare(optimizer)
        try:
            optimizer.step()
            outcomes.append([torch.view_as_real(p.detach()) if p.is_complex() else p.detach().clone()
                             for p in params])
        except RuntimeError as error:
            outcomes.append((type(error), str(error)))
    ours, theirs = outcomes
    if isinstance(theirs, tuple):
        assert ours == theirs
    else:
        assert not isinstance(ours, tuple), ours
        for mine, reference in zip(ours, theirs):
            if reference.dtype.is_floating_point:
                assert_close(mine.double(), reference.double(), torch.float64, name)
            else:
                assert torch.equal(mine, reference), (mine, reference)
