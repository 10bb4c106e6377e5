"""gpunn's layers and losses under torch.compile(fullgraph=True): every op is a custom op (gpunn::<name>), one
opaque node to the compiler, so a model of gpunn modules compiles without a graph break and computes what it
computes eagerly, forward and backward, through the same Triton kernels.

On the CPU the compiled graph runs with the aot_eager backend (AOTAutograd's forward and backward graphs,
without inductor's C++ compile); on a GPU with inductor.
"""
from __future__ import annotations

import pytest
import torch
from helpers import count_launches

import gpunn
from bench.harness import capture_cuda_graph
from gpunn import masks


class EveryLayer(torch.nn.Module):
    """x (B, 2, 6, 6) -> local 2-D -> flatten -> masked -> linear(gelu) and, beside it, a sequence through
    a local 1-D layer and a two-layer bidirectional RNN, and one RNN cell step: logits (B, 5)."""

    def __init__(self, device):
        super().__init__()
        self.local = gpunn.LocallyConnected2d(2, 3, (6, 6), 3, padding=1, device=device)
        self.masked = gpunn.MaskedLinear(3 * 36, 24, masks.local_1d(3 * 36, 24, 9), activation="relu",
                                         device=device)
        self.local1d = gpunn.LocallyConnected1d(2, 4, 6, 3, padding=1, device=device)
        self.rnn = gpunn.RNN(4, 8, num_layers=2, bidirectional=True, batch_first=True, device=device)
        self.cell = gpunn.RNNCell(24, 16, device=device)
        self.head = gpunn.Linear(16 + 16, 5, activation="gelu", device=device)

    def forward(self, x):
        flat = self.local(x).relu().flatten(1)
        hidden = self.cell(self.masked(flat))
        sequence = self.local1d(x[:, :, 0, :]).transpose(1, 2)  # (B, 6 steps, 4 features)
        _, h_n = self.rnn(sequence)
        return self.head(torch.cat([hidden, h_n[-2:].transpose(0, 1).flatten(1)], dim=1))


def _backend(device) -> str:
    return "inductor" if device.type == "cuda" else "aot_eager"


def _step(model, x, target, loss_fns):
    """Loss and every gradient (parameters, then the input) of one forward and backward."""
    logits = model(x)
    loss = loss_fns[0](logits, target) + loss_fns[1](logits, torch.zeros_like(logits))
    grads = torch.autograd.grad(loss, [*model.parameters(), x])
    return loss.detach(), grads


def _every_layer_step(device, seed):
    """(model, x, target, loss_fns, the eager step's loss, its gradients): EveryLayer's problem, run eagerly."""
    torch.manual_seed(seed)
    model = EveryLayer(device)
    x = torch.randn(3, 2, 6, 6, device=device, requires_grad=True)
    target = torch.tensor([0, 4, 2], device=device)
    loss_fns = (gpunn.CrossEntropyLoss(label_smoothing=0.1), gpunn.MSELoss())
    return model, x, target, loss_fns, *_step(model, x, target, loss_fns)


def _assert_same_step(step, eager_loss, eager_grads):
    """The same kernels on the same inputs: the same numbers."""
    loss, grads = step
    assert torch.equal(loss, eager_loss)
    for ours, theirs in zip(grads, eager_grads):
        assert torch.equal(ours, theirs)


def test_a_model_of_every_layer_compiles_without_graph_breaks(device):
    model, x, target, loss_fns, eager_loss, eager_grads = _every_layer_step(device, seed=0)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=_backend(device))
    # Dynamo refuses every torch.nn.RNN subclass unless told otherwise, gpunn.RNN included.
    with count_launches() as launches, torch._dynamo.config.patch(allow_rnn=True):
        step = _step(compiled, x, target, loss_fns)
    # (IEEE fp32, as the tests run, has no resident RNN backward: the split kernel runs it.)
    for kernel in ("local_forward_kernel", "masked_forward_kernel", "rnn_cell_forward_kernel",
                   "rnn_sequence_forward_kernel", "rnn_split_backward_kernel", "dense_grad_weight_kernel",
                   "local_grad_input_kernel", "masked_grad_weight_kernel", "cross_entropy_backward_kernel",
                   "mse_backward_kernel"):
        assert launches.get(kernel, 0) > 0, kernel
    _assert_same_step(step, eager_loss, eager_grads)


def test_make_fx_over_real_tensors_records_the_custom_ops(device):
    """make_fx with real tensors (its default) records each layer and loss as its gpunn:: op, and the graph
    computes, forward and backward, what the model does: the kernels' launches alone it would not see (under
    the interpreter, tracing them failed inside the launch)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model, x, target, loss_fns, eager_loss, eager_grads = _every_layer_step(device, seed=3)
    graph = make_fx(lambda x, target: _step(model, x, target, loss_fns))(x, target)
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {"gpunn.locally_connected.default", "gpunn.linear.default", "gpunn.rnn_layer.default",
            "gpunn.rnn_cell.default", "gpunn.cross_entropy.default", "gpunn.mse_loss.default"} <= ops, ops
    _assert_same_step(graph(x, target), eager_loss, eager_grads)


def test_a_whole_training_step_with_gpunn_sgd_compiles(device):
    # forward, loss, backward and gpunn.optim.SGD's step under one torch.compile: the step runs eagerly (a graph
    # break; Dynamo had traced into the kernel's launch and failed), the updated weights the eager step's.
    results = []
    for compiled in (False, True):
        torch.manual_seed(7)
        model = torch.nn.Sequential(gpunn.Linear(6, 8, activation="relu", device=device), gpunn.Linear(8, 3,
                                                                                                        device=device))
        optimizer = gpunn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, target = torch.randn(5, 6, device=device), torch.tensor([0, 2, 1, 1, 0], device=device)

        def train_step():
            optimizer.zero_grad()
            loss = gpunn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            return loss.detach()

        step = torch.compile(train_step, backend=_backend(device)) if compiled else train_step
        with count_launches() as launches:
            losses = [step() for _ in range(2)]
        assert launches["sgd_kernel"] == 2  # one launch a step, for every parameter
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (losses, params) = results
    for ours, theirs in zip(losses + params, eager_losses + eager_params):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_compiled_inference_and_a_second_batch_size(device):
    torch.manual_seed(1)
    model = EveryLayer(device).eval()
    compiled = torch.compile(model, fullgraph=True, backend=_backend(device), dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        for batch in (3, 5):
            x = torch.randn(batch, 2, 6, 6, device=device)
            assert torch.equal(compiled(x), model(x))


def test_a_model_of_every_layer_under_autocast_computes_what_a_cast_model_does(device):
    """Under autocast (bfloat16 on a GPU, float16 on the CPU, whose interpreter rounds bfloat16 by
    truncation) every gpunn layer casts its input and float32 parameters to the autocast dtype as torch's
    layers do, and the losses run in float32: the same numbers as the model cast to that dtype, bit for
    bit, with float32 gradients for the float32 parameters."""
    import copy

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    torch.manual_seed(4)
    model = EveryLayer(device)
    cast = copy.deepcopy(model).to(dtype)
    x = torch.randn(3, 2, 6, 6, device=device)
    target = torch.tensor([1, 0, 3], device=device)
    loss_fns = (gpunn.CrossEntropyLoss(label_smoothing=0.1), gpunn.MSELoss())

    def loss_of(logits, to=lambda t: t):  # to: the float32 cast autocast makes for each loss separately
        return loss_fns[0](to(logits), target) + loss_fns[1](to(logits), to(torch.zeros_like(logits)))

    with torch.autocast(device.type, dtype=dtype), count_launches() as launches:
        logits = model(x)
        loss = loss_of(logits)
    loss.backward()
    expected_logits = cast(x.to(dtype))
    expected_loss = loss_of(expected_logits, lambda t: t.float())
    expected_loss.backward()
    assert logits.dtype == dtype and loss.dtype == torch.float32
    assert "rnn_sequence_forward_kernel" in launches and "cross_entropy_forward_kernel" in launches
    assert torch.equal(logits, expected_logits) and torch.equal(loss, expected_loss)
    for (name, ours), theirs in zip(model.named_parameters(), cast.parameters()):
        assert ours.grad.dtype == torch.float32, name
        assert torch.equal(ours.grad, theirs.grad.float()), name


def test_a_model_of_every_layer_compiles_without_graph_breaks_under_autocast(device):
    """A mixed-precision training step: the model compiled with fullgraph=True, called under autocast in grad
    mode (the weight-cast cache steps aside while Dynamo traces), computes what it computes eagerly."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    model, x, target, loss_fns, *_ = _every_layer_step(device, seed=6)
    results = []
    for run in (model, torch.compile(model, fullgraph=True, backend=_backend(device))):
        torch._dynamo.reset()
        with torch.autocast(device.type, dtype=dtype), torch._dynamo.config.patch(allow_rnn=True):
            results.append(_step(run, x, target, loss_fns))
    _assert_same_step(results[1], *results[0])


def test_the_losses_compile_without_graph_breaks(device):
    # Class indices, class probabilities (with smoothing and weights) and MSE, each compiled whole, forward and
    # backward: the same numbers as eager, through the same kernels.
    torch._dynamo.reset()
    x = torch.randn(6, 5, device=device, requires_grad=True)
    index = torch.tensor([0, 4, 2, 1, -100, 3], device=device)
    soft = torch.softmax(torch.randn(6, 5, device=device), 1).requires_grad_()
    weight = torch.rand(5, device=device) + 0.5

    def losses(x, index, soft):
        # Each loss returned as gpunn computes it: a sum of them compiled by inductor may add in another order.
        return (gpunn.losses.cross_entropy(x, index, weight, label_smoothing=0.1),
                gpunn.losses.cross_entropy(x, soft, weight, label_smoothing=0.1, reduction="none"),
                gpunn.losses.mse_loss(x, soft))

    def gradients(outputs):
        return torch.autograd.grad(outputs, [x, soft], [torch.ones_like(output) for output in outputs])

    compiled = torch.compile(losses, fullgraph=True, backend=_backend(device))
    with count_launches() as launches:
        outputs = compiled(x, index, soft)
        grads = gradients(outputs)
    backward_kernels = {"cross_entropy_backward_kernel", "cross_entropy_probs_backward_kernel", "mse_backward_kernel"}
    assert backward_kernels <= set(launches)
    eager = losses(x, index, soft)
    for ours, theirs in zip(outputs + grads, eager + gradients(eager)):
        assert torch.equal(ours, theirs)


def test_fake_shapes_match_real_ones(device):
    """Each op's fake implementation (what the compiler plans with) gives the shapes and dtypes its real one
    returns, including odd shapes, a 3-D input and outputs that are not asked for."""
    ops = [(torch.ops.gpunn.linear, (torch.randn(2, 3, 5), torch.randn(7, 5), None, None, 0, 0, "gelu", 0.01, True,
                                     0)),
           (torch.ops.gpunn.linear, (torch.randn(6, 5), torch.randn(3, 7, 5), torch.randn(3, 7), None, 0, 0, "gelu",
                                     0.01, True, 3)),
           (torch.ops.gpunn.linear, (torch.randn(6, 5), torch.randn(2, 7, 5), torch.randn(2, 7),
                                     torch.rand(7, 5) < 0.5, 32, 32, "relu", 0.01, False, 2)),
           (torch.ops.gpunn.linear_grad_input, (torch.randn(6, 7), None, torch.randn(3, 7, 5), None, 0, 0, None, 3)),
           (torch.ops.gpunn.linear_grad_weight, (torch.randn(6, 7), None, torch.randn(6, 5), [7, 5], None, 0, 0, None,
                                                 True, 0)),
           (torch.ops.gpunn.linear_grad_weight, (torch.randn(6, 7), None, torch.randn(6, 5), [7, 5], None, 0, 0, None,
                                                 True, 3)),
           (torch.ops.gpunn.linear_grad_preactivation, (torch.randn(2, 3, 7), torch.randn(6, 7), "gelu", True, True,
                                                        0)),
           (torch.ops.gpunn.linear_grad_preactivation, (torch.randn(6, 7), None, None, False, True, 2)),
           (torch.ops.gpunn.linear_backward, (torch.randn(2, 3, 7), torch.randn(6, 7), torch.randn(2, 3, 5),
                                              torch.randn(7, 5), None, None, 0, 0, "gelu", 0.01, True, False, True, 0,
                                              0)),
           (torch.ops.gpunn.linear_backward, (torch.randn(6, 7), torch.randn(6, 7), torch.randn(6, 5),
                                              torch.randn(7, 5), torch.randn(7), torch.rand(7, 5) < 0.5, 32, 32,
                                              "tanh", 0.01, False, True, True, 3, 0)),
           (torch.ops.gpunn.linear_backward, (torch.randn(6, 7), torch.randn(6, 7), torch.randn(6, 5),
                                              torch.randn(3, 7, 5), torch.randn(3, 7), None, 0, 0, "tanh", 0.01, True,
                                              True, True, 3, 3)),
           (torch.ops.gpunn.locally_connected_grad_input, (torch.randn(2, 3, 2, 2), torch.randn(3, 4, 8),
                                                           [2, 3, 3], [2, 2, 1, 1, 0, 0, 1, 1, 0, 0])),
           (torch.ops.gpunn.locally_connected_grad_weight, (None, torch.randn(4, 3, 2, 2), [2, 3, 3], [3, 4, 8],
                                                            [2, 2, 1, 1, 0, 0, 1, 1, 0, 0], True, 0)),
           (torch.ops.gpunn.locally_connected_grad_weight, (torch.randn(4, 2, 3, 3), torch.randn(4, 3, 2, 2),
                                                            [2, 3, 3], [3, 4, 8], [2, 2, 1, 1, 0, 0, 1, 1, 0, 0],
                                                            True, 2)),
           (torch.ops.gpunn.rnn_cell_grad_input, (torch.randn(3, 4), torch.randn(3, 4), None, torch.randn(4, 4),
                                                  "tanh")),
           (torch.ops.gpunn.cross_entropy, (torch.randn(4, 6), torch.tensor([0, 5, -100, 2]), None, -100, 0.0, "sum",
                                            0)),
           (torch.ops.gpunn.cross_entropy, (torch.randn(4, 6), torch.tensor([0, 5, -100, 2]), None, -100, 0.0, "mean",
                                            2)),
           (torch.ops.gpunn.cross_entropy_probs, (torch.randn(4, 6), torch.rand(4, 6), torch.rand(6), 0.1, "none",
                                                  False, 0)),
           (torch.ops.gpunn.cross_entropy_probs, (torch.randn(4, 6), torch.rand(4, 6), torch.rand(6), 0.1, "sum",
                                                  False, 4)),
           (torch.ops.gpunn.cross_entropy_probs_backward, (torch.tensor(1.0), torch.randn(4, 6), torch.rand(4, 6), None,
                                                           0.0, torch.randn(4, 2), torch.rand(4), "mean", True, False,
                                                           0)),
           (torch.ops.gpunn.mse_loss, (torch.randn(6), torch.randn(6), "none", 0)),
           (torch.ops.gpunn.mse_loss, (torch.randn(6), torch.randn(6), "mean", 3))]
    for op, args in ops:
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_dense_gradient_ops_refuse_an_activation(device):
    # The dense GEMM ops take dz: an activation or a saved tensor there would be ignored, so it is refused;
    # the pass that forms dz needs the saved tensor its activation reads.
    dy, w, x = (torch.randn(*shape, device=device) for shape in ((6, 7), (7, 5), (6, 5)))
    with pytest.raises(ValueError, match="take dz"):
        torch.ops.gpunn.linear_grad_input(dy, dy, w, None, 0, 0, "gelu", 0)
    with pytest.raises(ValueError, match="take dz"):
        torch.ops.gpunn.linear_grad_weight(dy, None, x, [7, 5], None, 0, 0, "relu", True, 0)
    with pytest.raises(ValueError, match="saved"):
        torch.ops.gpunn.linear_grad_preactivation(dy, None, "gelu", True, True, 0)


def _replays_like_eager_steps(model, x, target):
    """After warm-up (autotuning, the mask's layout, SGD's table), one forward, loss, backward and SGD step of
    model is captured in a CUDA graph; replaying it trains exactly as eager steps train a copy, following a
    learning-rate schedule (a tensor on the device, halved after every replay)."""
    import copy

    twin = copy.deepcopy(model)

    def trainer(net):
        loss_fn = gpunn.CrossEntropyLoss()
        lr = torch.tensor(0.1, device=x.device)
        optimizer = gpunn.optim.SGD(net.parameters(), lr=lr, momentum=0.9)

        def step():
            optimizer.zero_grad(set_to_none=False)  # the gradients keep their memory, as the graph needs
            loss = loss_fn(net(x), target)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return step, lr

    warmup, replays = 3, 2
    step, lr = trainer(model)
    graph, static_loss = capture_cuda_graph(step, warmup)
    for _ in range(replays):
        graph.replay()
        lr.mul_(0.5)
    torch.cuda.synchronize()

    eager_step, eager_lr = trainer(twin)
    losses = []
    for index in range(warmup + replays):
        losses.append(eager_step())
        if index >= warmup:
            eager_lr.mul_(0.5)
    assert torch.equal(static_loss, losses[-1])
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.equal(ours, theirs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_training_step_is_captured_in_a_cuda_graph(device):
    # dense, masked, locally connected and RNN-cell layers
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        gpunn.LocallyConnected2d(1, 2, (6, 6), 3, padding=1, device=device), torch.nn.Flatten(),
        gpunn.MaskedLinear(72, 32, masks.local_1d(72, 32, 9), activation="gelu", device=device),
        gpunn.RNNCell(32, 16, device=device), gpunn.Linear(16, 4, device=device))
    _replays_like_eager_steps(model, torch.randn(16, 1, 6, 6, device=device), torch.randint(0, 4, (16,), device=device))


class LastStep(torch.nn.Module):
    """x (B, T, I) -> a bidirectional RNN -> its last step's output -> logits (B, 4)."""

    def __init__(self, hidden, device, dtype):
        super().__init__()
        self.rnn = gpunn.RNN(5, hidden, bidirectional=True, batch_first=True, device=device, dtype=dtype)
        self.head = gpunn.Linear(2 * hidden, 4, device=device, dtype=dtype)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("split", [False, True], ids=["resident", "split"])
def test_an_rnn_training_step_is_captured_in_a_cuda_graph(device, monkeypatch, split):
    # W_hh on chip (float64: IEEE fp32 has no resident backward); and past the resident limit (forced) the split
    # kernels, one cooperative launch a direction with a grid barrier a step, whose barrier counter is zeroed
    # inside the graph on every replay.
    from gpunn.kernels import rnn_sequence
    if split:
        monkeypatch.setattr(rnn_sequence, "RESIDENT_BYTES", 0)
    torch.manual_seed(3)
    x = torch.randn(24, 7, 5, device=device, dtype=torch.float64)
    target = torch.randint(0, 4, (24,), device=device)
    with count_launches() as launches:
        _replays_like_eager_steps(LastStep(40, device, torch.float64), x, target)
    path = "split" if split else "sequence"
    assert {name for name in launches if name.startswith("rnn_")} == {
        f"rnn_{path}_forward_kernel", f"rnn_{path}_backward_kernel"}
