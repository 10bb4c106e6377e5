"""gpunn.RNNCell / functional.rnn_cell against torch.nn.RNNCell in float64: outputs and every gradient,
the drop-in contract (init, state_dict, errors), and the fused launches."""
from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, TorchOpSpy, assert_close, case_seed, count_launches, dtypes_for, rel_error

import gpunn

RNN_KERNELS = ("rnn_cell_forward_kernel", "rnn_cell_grad_input_kernel", "rnn_cell_grad_weight_kernel")


def _pair(device, dtype, input_size, hidden_size, **kwargs):
    """A gpunn.RNNCell and a torch.nn.RNNCell in float64 holding the same (rounded) weights."""
    ours = gpunn.RNNCell(input_size, hidden_size, device=device, dtype=dtype, **kwargs)
    ref = torch.nn.RNNCell(input_size, hidden_size, device=device, dtype=torch.float64, **kwargs)
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, ref


def run_cell_case(device, dtype, batch, input_size, hidden_size, nonlinearity="tanh", bias=True, hidden=True,
                  unbatched=False):
    gen = torch.Generator().manual_seed(case_seed(batch, input_size, hidden_size, nonlinearity, bias))
    ours, ref = _pair(device, dtype, input_size, hidden_size, bias=bias, nonlinearity=nonlinearity)
    lead = () if unbatched else (batch,)
    x = torch.randn(*lead, input_size, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    h = torch.randn(*lead, hidden_size, generator=gen).to(device=device, dtype=dtype).requires_grad_() if hidden \
        else None
    out = ours(x, h)
    x64 = x.detach().double().requires_grad_()
    h64 = h.detach().double().requires_grad_() if hidden else None
    expected = ref(x64, h64)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype, "output")
    dy = torch.randn(expected.shape, generator=gen).to(device=device, dtype=dtype)
    ours_inputs = [t for t in (x, h) if t is not None] + list(ours.parameters())
    ref_inputs = [t for t in (x64, h64) if t is not None] + list(ref.parameters())
    names = ["input", "hx"][:1 + hidden] + [name for name, _ in ours.named_parameters()]
    for name, g, g64 in zip(names, torch.autograd.grad(out, ours_inputs, dy),
                            torch.autograd.grad(expected, ref_inputs, dy.double())):
        assert g.dtype == dtype
        assert_close(g, g64, dtype, f"grad {name}")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matches_torch(device, nonlinearity, bias):
    run_cell_case(device, torch.float64, 5, 37, 45, nonlinearity, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_dtypes(device, dtype):
    if dtype not in dtypes_for(device):
        pytest.skip("bfloat16 is checked on a GPU only (the interpreter cannot compute it natively)")
    run_cell_case(device, dtype, 7, 33, 40)


@pytest.mark.parametrize("sizes", [(1, 1, 1), (3, 70, 33), (40, 5, 65)], ids=str)
def test_odd_sizes(device, sizes):
    run_cell_case(device, torch.float64, *sizes, nonlinearity="relu")


def test_without_hidden_state_and_unbatched(device):
    run_cell_case(device, torch.float64, 4, 9, 11, hidden=False)
    run_cell_case(device, torch.float64, 1, 9, 11, unbatched=True)
    run_cell_case(device, torch.float64, 1, 9, 11, unbatched=True, hidden=False)


def test_unrolled_sequence_trains_like_torch(device):
    # Five steps through one cell, the loss on the last state: every gradient flows through the recurrence.
    ours, ref = _pair(device, torch.float64, 6, 8)
    xs = torch.randn(5, 3, 6, device=device, dtype=torch.float64)
    losses = []
    for cell in (ours, ref):
        h = None
        for x in xs:
            h = cell(x, h)
        loss = h.square().sum()
        loss.backward()
        losses.append(loss)
    assert_close(losses[0], losses[1], torch.float64, "loss")
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, torch.float64, f"grad {name}")


def test_drop_in_contract(device):
    torch.manual_seed(0)
    ours = gpunn.RNNCell(10, 20, nonlinearity="relu", device=device)
    torch.manual_seed(0)
    theirs = torch.nn.RNNCell(10, 20, nonlinearity="relu", device=device)
    assert isinstance(ours, torch.nn.RNNCell)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name
    assert repr(ours) == repr(theirs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x, h = torch.randn(4, 10, device=device), torch.randn(4, 20, device=device)
    assert rel_error(ours(x, h), theirs(x, h)) < TOLERANCE[torch.float32]


def test_fused_launches_and_no_torch_matmul(device):
    cell = gpunn.RNNCell(12, 16, device=device)
    x = torch.randn(4, 12, device=device, requires_grad=True)
    h = torch.randn(4, 16, device=device, requires_grad=True)
    with count_launches() as launches, TorchOpSpy() as spy:
        cell(x, h).sum().backward()
    assert launches == dict.fromkeys(RNN_KERNELS, 1)
    assert not spy.matmuls(), spy.matmuls()
    assert not {"aten.rnn_tanh_cell", "aten.tanh", "aten.tanh_backward"} & set(spy.ops)


def test_frozen_weights_skip_the_weight_gradient(device):
    cell = gpunn.RNNCell(12, 16, device=device).requires_grad_(False)
    x = torch.randn(4, 12, device=device, requires_grad=True)
    with count_launches() as launches:
        cell(x).sum().backward()
    assert launches == {"rnn_cell_forward_kernel": 1, "rnn_cell_grad_input_kernel": 1}


def test_strided_inputs_and_grad_output(device):
    ours, ref = _pair(device, torch.float64, 9, 7)
    x = torch.randn(9, 4, device=device, dtype=torch.float64).t().requires_grad_()  # (4, 9), column-major
    h = torch.randn(4, 14, device=device, dtype=torch.float64)[:, ::2].requires_grad_()  # every other column
    dy = torch.randn(7, 4, device=device, dtype=torch.float64).t()
    out = ours(x, h)
    x64, h64 = x.detach().requires_grad_(), h.detach().requires_grad_()
    expected = ref(x64, h64)
    assert_close(out, expected, torch.float64, "output")
    for g, g64 in zip(torch.autograd.grad(out, (x, h, *ours.parameters()), dy),
                      torch.autograd.grad(expected, (x64, h64, *ref.parameters()), dy)):
        assert_close(g, g64, torch.float64, "gradient")


def test_strided_biases_and_transposed_weights(device):
    # Any strides through the functional form: column-major weights, every-other-element and broadcast biases.
    x, h = torch.randn(3, 5, device=device, dtype=torch.float64), torch.randn(3, 4, device=device, dtype=torch.float64)
    w_ih = torch.randn(5, 4, device=device, dtype=torch.float64).t()
    w_hh = torch.randn(4, 4, device=device, dtype=torch.float64).t()
    b_ih = torch.randn(8, device=device, dtype=torch.float64)[::2]
    b_hh = torch.randn(1, device=device, dtype=torch.float64).expand(4)
    out = gpunn.functional.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, "tanh")
    expected = torch.tanh(x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh)
    assert_close(out, expected, torch.float64, "output")


@pytest.mark.parametrize("given", ["bias_ih", "bias_hh"])
def test_one_bias_alone_as_torchs_cell_functions_take_it(device, given):
    f64 = dict(device=device, dtype=torch.float64)
    x, h, w_ih, w_hh, bias = (torch.randn(*shape, **f64, requires_grad=True) for shape in ((3, 5), (3, 4), (4, 5),
                                                                                           (4, 4), (4,)))
    biases = (bias, None) if given == "bias_ih" else (None, bias)
    with count_launches() as launches:
        out = gpunn.functional.rnn_cell(x, h, w_ih, w_hh, *biases, "relu")
    expected = torch.rnn_relu_cell(x, h, w_ih, w_hh, *biases)
    assert launches == {"rnn_cell_forward_kernel": 1}
    assert_close(out, expected, torch.float64, "output")
    grad = torch.randn(3, 4, **f64)
    for ours, theirs in zip(torch.autograd.grad(out, (x, h, w_ih, w_hh, bias), grad),
                            torch.autograd.grad(expected, (x, h, w_ih, w_hh, bias), grad)):
        assert_close(ours, theirs, torch.float64, "gradient")


@pytest.mark.parametrize("wanted", ["hx", "bias_hh", "weight_hh", "input+bias_ih"])
def test_only_the_gradients_asked_for(device, wanted):
    ours, ref = _pair(device, torch.float64, 6, 5)
    x = torch.randn(70, 6, device=device, dtype=torch.float64)  # more rows than one interpreter tile
    h = torch.randn(70, 5, device=device, dtype=torch.float64)
    names = wanted.split("+")
    ours_leaves, ref_leaves = {"input": x.clone(), "hx": h.clone()}, {"input": x.clone(), "hx": h.clone()}
    ours_leaves.update(dict(ours.named_parameters()))
    ref_leaves.update(dict(ref.named_parameters()))
    for leaves in (ours_leaves, ref_leaves):
        for name, t in leaves.items():
            t.requires_grad_(name in names)
    out = ours(ours_leaves["input"], ours_leaves["hx"])
    expected = ref(ref_leaves["input"], ref_leaves["hx"])
    dy = torch.randn_like(expected)
    for name, g, g64 in zip(names, torch.autograd.grad(out, [ours_leaves[n] for n in names], dy),
                            torch.autograd.grad(expected, [ref_leaves[n] for n in names], dy)):
        assert_close(g, g64, torch.float64, f"grad {name}")


def test_the_forward_pruner_budgets_tanh_and_tuning_keys_on_it(monkeypatch):
    import triton

    from gpunn.kernels import rnn, tiling
    monkeypatch.setattr(tiling, "AUTOTUNE", True)  # GPUNN_AUTOTUNE=0 keeps one config: compare whole sets
    gpu_configs = [triton.Config({"BLOCK_B": r, "BLOCK_H": c, "BLOCK_K": k}, num_stages=s, num_warps=w)
                   for r, c, k, s, w in tiling.GPU_TILES]
    args = {"x_ptr": torch.empty(0), "B_BUCKET": 4096}
    kept = {act: rnn._forward_pruner()(gpu_configs, args, ACT=code, DOT_PRECISION="tf32", ROW_ALIGN=16)
            for act, code in (("relu", 1), ("tanh", 5))}
    assert set(map(str, kept["tanh"])) < set(map(str, kept["relu"]))
    assert "ACT" in rnn.rnn_cell_forward_kernel.autotuner.keys  # a tanh call must not reuse a relu pick


def test_bitwise_deterministic(device):
    cell = gpunn.RNNCell(20, 30, device=device)
    x, h = torch.randn(6, 20, device=device, requires_grad=True), torch.randn(6, 30, device=device)
    runs = []
    for _ in range(2):
        out = cell(x, h)
        runs.append((out, *torch.autograd.grad(out, (x, *cell.parameters()), torch.ones_like(out))))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("make_args,error,match", [
    (lambda d: (torch.randn(2, 3, 10, device=d), None), ValueError, "Expected input to be 1D or 2D"),
    (lambda d: (torch.randn(2, 10, device=d), torch.randn(1, 2, 20, device=d)), ValueError,
     "Expected hidden to be 1D or 2D"),
    (lambda d: (torch.randn(2, 9, device=d), None), RuntimeError, "input has inconsistent input_size"),
    (lambda d: (torch.randn(2, 10, device=d), torch.randn(3, 20, device=d)), RuntimeError,
     "doesn't match hidden0 batch size"),
    (lambda d: (torch.randn(2, 10, device=d), torch.randn(2, 21, device=d)), RuntimeError,
     "hidden0 has inconsistent hidden_size"),
    # An unbatched input with a batched hx, and the reverse: torch's size checks come before any dim check.
    (lambda d: (torch.randn(10, device=d), torch.randn(1, 20, device=d)), RuntimeError,
     "hidden0 has inconsistent hidden_size: got 1, expected 20"),
    (lambda d: (torch.randn(2, 10, device=d), torch.randn(20, device=d)), RuntimeError,
     "Input batch size 2 doesn't match hidden0 batch size 20"),
    (lambda d: (torch.randn(2, 10, device=d, dtype=torch.float64), None), RuntimeError, "dtype"),
])
def test_bad_inputs_raise_like_torch_before_any_launch(device, make_args, error, match):
    ours = gpunn.RNNCell(10, 20, device=device)
    theirs = torch.nn.RNNCell(10, 20, device=device)
    args = make_args(device)
    with count_launches() as launches, pytest.raises(error, match=match):
        ours(*args)
    assert launches == {}
    with pytest.raises(error):
        theirs(*args)


def test_unknown_nonlinearity_raises_like_torch(device):
    for cell in (gpunn.RNNCell(3, 4, nonlinearity="gelu", device=device),
                 torch.nn.RNNCell(3, 4, nonlinearity="gelu", device=device)):
        with pytest.raises(RuntimeError, match="Unknown nonlinearity"):
            cell(torch.randn(2, 3, device=device))
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        gpunn.functional.rnn_cell(torch.randn(2, 3), None, torch.randn(4, 3), torch.randn(4, 4), nonlinearity="gelu")


def test_autocast_matches_torch(device):
    ours, _ = _pair(device, torch.float32, 6, 8)
    theirs = torch.nn.RNNCell(6, 8, device=device)
    x = torch.randn(3, 6, device=device)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        assert ours(x).dtype == theirs(x).dtype


def test_autocast_saves_one_copy_of_each_weight_however_many_steps(device):
    # torch's autocast casts a parameter once a region and every call saves that copy: a cell unrolled over T
    # steps saves one bf16 W_ih and W_hh, not T of each (gpunn had cast, and saved, a copy a call).
    cell = gpunn.RNNCell(6, 8, device=device)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    x = torch.randn(3, 6, device=device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast(device.type, dtype=dtype):
            h = torch.zeros(3, 8, device=device)
            for _ in range(5):
                h = cell(x, h)
    copies = {shape: {t.data_ptr() for t in saved if t.dtype == dtype and tuple(t.shape) == shape}
              for shape in ((8, 6), (8, 8))}
    assert {shape: len(ptrs) for shape, ptrs in copies.items()} == {(8, 6): 1, (8, 8): 1}
    h.float().sum().backward()
    # A copy is made again where the parameter changed, and one made without grad mode is not taken by a call
    # in grad mode (it has no graph back to the parameter; torch's own cache takes it there, stale and
    # detached, so the reference is a fresh region on the changed weights).
    cell.zero_grad()
    with torch.autocast(device.type, dtype=dtype):
        with torch.no_grad():
            cell(x)
            cell.weight_ih.mul_(2)
        cell(x).float().sum().backward()
    reference = torch.nn.RNNCell(6, 8, device=device)
    reference.load_state_dict(cell.state_dict())
    with torch.autocast(device.type, dtype=dtype):
        reference(x).float().sum().backward()
    assert_close(cell.weight_ih.grad.double(), reference.weight_ih.grad.double(), dtype, "weight_ih grad")
