"""gpunn.CrossEntropyLoss / MSELoss against torch.nn in float64: every reduction, class weights,
ignore_index, label smoothing, class-index and class-probability targets, input forms; forward and gradients;
torch's errors; the fused launches."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import TorchOpSpy, assert_close, assert_same_values, count_launches, dtypes_for, raises_exactly

import gpunn
from gpunn.kernels import losses as loss_kernels


def _ce_case(device, dtype, shape, classes, *, weighted, smoothing, reduction, ignore=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape[:1], classes, *shape[1:], generator=gen) * 3).to(device, dtype)
    target = torch.randint(0, classes, shape, generator=gen).to(device)
    if ignore and target.numel() > 1:
        target.view(-1)[::3] = -100
    weight = torch.rand(classes, generator=gen).to(device, dtype) + 0.1 if weighted else None
    x = logits.clone().requires_grad_()
    x64 = logits.double().requires_grad_()
    loss = gpunn.CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=smoothing)(x, target)
    ref = torch.nn.CrossEntropyLoss(weight=None if weight is None else weight.double(), reduction=reduction,
                                    label_smoothing=smoothing)(x64, target)
    assert loss.dtype == dtype and loss.shape == ref.shape
    assert_close(loss, ref, dtype, "loss")
    grad_out = torch.randn(ref.shape, generator=gen).to(device, dtype) if reduction == "none" else torch.tensor(
        1.7, device=device, dtype=dtype)
    (g,) = torch.autograd.grad(loss, x, grad_out)
    (g64,) = torch.autograd.grad(ref, x64, grad_out.double())
    assert_close(g, g64, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_cross_entropy_dtypes(device, dtype):
    if dtype not in dtypes_for(device):
        pytest.skip("bfloat16 is checked on a GPU only")
    _ce_case(device, dtype, (33,), 50, weighted=True, smoothing=0.1, reduction="mean")


def test_cross_entropy_all_ignored_is_nan_like_torch(device):
    x = torch.randn(2, 4, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.full((2,), -100, device=device)
    assert torch.isnan(gpunn.losses.cross_entropy(x, target)) and torch.isnan(F.cross_entropy(x, target))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignored", ["some", "all"])
def test_cross_entropy_mean_over_rows_of_no_weight_is_nan_like_torch(device, smoothing, ignored):
    """Every kept target's class weight 0 (a batch of only the classes the weights drop), or every target
    ignored: torch's mean is 0 / 0, NaN, smoothed or not, and so are the kept rows' gradient and second-order
    gradients (an ignored row's are 0) and the output gradient's second-order gradient, where the one sum
    gpunn divides would give +-inf (or 0 over no rows)."""
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    target = torch.tensor([0, -100, 0] if ignored == "some" else [-100] * 3, device=device)
    weight = torch.tensor([0.0, 1.0, 2.0, 1.0], device=device, dtype=torch.float64)
    probe = torch.randn(3, 4, device=device, dtype=torch.float64)
    results = []
    for loss in (gpunn.losses.cross_entropy, F.cross_entropy):
        leaf, scale = x.clone().requires_grad_(), torch.tensor(1.5, device=device, dtype=torch.float64,
                                                                requires_grad=True)
        value = scale * loss(leaf, target, weight, label_smoothing=smoothing)
        (grad,) = torch.autograd.grad(value, leaf, create_graph=True)
        results.append((value.detach(), grad.detach(), *torch.autograd.grad((grad * probe).sum(), (leaf, scale))))
    for ours, theirs, what in zip(*results, ("loss", "gradient", "input's second order", "scale's second order")):
        assert torch.equal(ours.isnan(), theirs.isnan()), what
        assert torch.equal(ours.nan_to_num(), theirs.nan_to_num()), what
    assert results[1][0].isnan() and results[1][3].isnan()
    assert results[1][1][0].isnan().all() == results[1][2][0].isnan().all() == (ignored == "some")


def test_cross_entropy_fused_launches_and_no_torch_softmax(device):
    x = torch.randn(8, 10, device=device, requires_grad=True)
    target = torch.randint(0, 10, (8,), device=device)
    with count_launches() as launches, TorchOpSpy() as spy:
        gpunn.CrossEntropyLoss(label_smoothing=0.1)(x, target).backward()
    assert launches == {"cross_entropy_forward_kernel": 1, "reduced_loss_kernel": 1, "cross_entropy_backward_kernel": 1}
    assert not {"aten._log_softmax", "aten._softmax", "aten.nll_loss_forward", "aten.logsumexp"} & set(spy.ops)


def test_cross_entropy_errors_match_torch(device):
    x = torch.randn(3, 4, device=device)
    good = torch.tensor([0, 1, 2], device=device)
    cases = [(x, torch.tensor([0, 1, 7], device=device), {}), (x, torch.tensor([0, 1, -5], device=device), {}),
             (x, torch.tensor([0, 1], device=device), {}), (x, good.int(), {}),
             (x, good, dict(weight=torch.ones(3, device=device))), (x, good, dict(label_smoothing=1.5)),
             (x, good, dict(reduction="bad")),
             (x[0], torch.tensor([0, 1], device=device), {}),  # unbatched logits: a (1,) target at most
             (x, torch.tensor(1, device=device), {}),  # a batch of logits, a 0-dim target
             (x[0, 0], torch.tensor(0, device=device), {}), (x[0, :1], torch.tensor([0], device=device), {}),
             (x.double(), good, dict(weight=torch.ones(4, device=device))),  # class indices: no promotion
             (x[0], torch.tensor([1, 2, 3], device=device, dtype=torch.int32), {}),  # unbatched: dtype first
             (x[:0], torch.tensor(1, device=device), {}),
             (x, good, dict(ignore_index=True)), (x, good, dict(ignore_index=1.0)),  # an int, as torch's parser
             (x, good, dict(ignore_index=torch.tensor(1.0))),
             (x, good, dict(ignore_index=2**63)), (x, good, dict(ignore_index=-2**63 - 1)),  # past int64
             (x, good, dict(label_smoothing=torch.tensor([0.1], device=device))), (x, good, dict(label_smoothing="0")),
             (x.tolist(), good, {}), (x, good.tolist(), {}), (x, good, dict(weight=[1.0] * 4)),  # not tensors
             (x.long(), good, dict(weight=torch.ones(4, device=device, dtype=torch.float64)))]
    for logits, target, kwargs in cases:
        # torch's reference runs on the CPU: on CUDA its out-of-range target is a device-side assert, which raises
        # nothing here and leaves the process's CUDA context unusable. gpunn checks targets on the host and raises.
        on_cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        with pytest.raises(Exception) as expected:
            F.cross_entropy(*(v.cpu() if torch.is_tensor(v) else v for v in (logits, target)), **on_cpu)
        with count_launches() as launches, raises_exactly(expected.type):
            gpunn.losses.cross_entropy(logits, target, **kwargs)
        assert launches == {}


def test_cross_entropy_unbatched_logits_take_a_target_of_one_element(device):
    logits = torch.randn(7, device=device, dtype=torch.float64, requires_grad=True)
    for target in (torch.tensor([4], device=device), torch.tensor(4, device=device)):
        for reduction in ("none", "mean"):
            loss = gpunn.losses.cross_entropy(logits, target, reduction=reduction)
            assert loss.shape == F.cross_entropy(logits.detach(), target, reduction=reduction).shape == ()
            # torch's own backward refuses the (1,) form ("size mismatch"): its 0-dim twin is the reference.
            ref = F.cross_entropy(logits, target.reshape(()), reduction=reduction)
            assert_close(loss, ref, torch.float64, "loss")
            assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0], torch.float64,
                         "grad")


def test_cross_entropy_ignore_index_may_be_past_the_classes(device):
    """ignore_index = 255 with 4 classes (segmentation's convention): those targets are ignored, not out of range."""
    logits = torch.randn(6, 4, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 255, 3, 255, 1, 2], device=device)
    loss = gpunn.losses.cross_entropy(logits, target, ignore_index=255)
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert_close(loss, ref, torch.float64, "loss")
    assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0], torch.float64, "grad")


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_kernels_never_read_through_a_bad_target(device, smoothing):
    """While a CUDA graph is captured the host cannot check targets: then the kernels themselves keep an out-of-range
    target from becoming an address, and only its row turns NaN (loss and gradient)."""
    from gpunn.kernels import losses as kernels

    logits = torch.randn(5, 4, device=device, dtype=torch.float64)
    target = torch.tensor([0, 9, -100, -3, 3], device=device)
    weight = torch.rand(4, device=device, dtype=torch.float64) + 0.5
    row_loss, row_weight, lse = kernels.cross_entropy_forward(logits, target, weight, -100, smoothing)
    good = torch.tensor([True, False, True, False, True], device=device)
    assert row_loss[~good].isnan().all() and not row_loss[good].isnan().any()
    ref = F.cross_entropy(logits[[0, 4]], target[[0, 4]], weight, reduction="none", label_smoothing=smoothing)
    assert torch.allclose(row_loss[[0, 4]], ref, rtol=1e-12, atol=0)
    dx = kernels.cross_entropy_backward(logits, target, weight, -100, smoothing, lse,
                                        torch.ones(5, device=device, dtype=torch.float64), "none", None)
    assert dx[~good].isnan().all() and not dx[good].isnan().any() and (dx[2] == 0).all()


def _soft_case(device, dtype, shape, classes, *, weighted, smoothing, reduction, target_dtype=None, seed=0):
    """Class-probability targets (smoothed random distributions, a few rows of zeros and unnormalised mass,
    which torch accepts): loss and the gradients of both logits and target against torch in float64."""
    gen = torch.Generator().manual_seed(seed)
    full = (*shape[:1], classes, *shape[1:])
    logits = (torch.randn(full, generator=gen) * 3).to(device, dtype)
    probabilities = torch.softmax(torch.randn(full, generator=gen, dtype=torch.float64), dim=1 if shape else 0)
    if probabilities.dim() > 1 and shape[0] > 2:
        probabilities[0] = 0.0
        probabilities[1] *= 1.5
    target = probabilities.to(device, target_dtype or dtype)
    weight = torch.rand(classes, generator=gen).to(device, dtype) + 0.1 if weighted else None
    x, t = logits.clone().requires_grad_(), target.clone().requires_grad_()
    x64, t64 = logits.double().requires_grad_(), target.double().requires_grad_()
    loss = gpunn.CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=smoothing)(x, t)
    ref = torch.nn.CrossEntropyLoss(weight=None if weight is None else weight.double(), reduction=reduction,
                                    label_smoothing=smoothing)(x64, t64)
    expected_dtype = torch.promote_types(dtype, target_dtype or dtype)
    assert loss.dtype == expected_dtype and loss.shape == ref.shape
    assert_close(loss, ref, expected_dtype, "loss")
    grad_out = torch.randn(ref.shape, generator=gen).to(device, expected_dtype)
    grads = torch.autograd.grad(loss, (x, t), grad_out)
    grads64 = torch.autograd.grad(ref, (x64, t64), grad_out.double())
    for name, g, g64, like in zip(("logits", "target"), grads, grads64, (x, t)):
        assert g.dtype == like.dtype
        assert_close(g, g64, like.dtype, f"grad {name}")


def _target_case(kind: str, shape):
    """The check of one target form: class indices (with an ignored row where there is a batch) or
    class probabilities."""
    if kind == "indices":
        return functools.partial(_ce_case, ignore=shape != ())
    return _soft_case


@pytest.mark.parametrize("kind", ["indices", "probabilities"])
@pytest.mark.parametrize("reduction,weighted,smoothing",
                         list(itertools.product(("mean", "sum", "none"), (False, True), (0.0, 0.15))), ids=str)
def test_cross_entropy_matches_torch(device, kind, reduction, weighted, smoothing):
    _target_case(kind, (13,))(device, torch.float64, (13,), 37, weighted=weighted, smoothing=smoothing,
                              reduction=reduction)


@pytest.mark.parametrize("kind", ["indices", "probabilities"])
@pytest.mark.parametrize("shape,classes", [((5,), 3000), ((1,), 1), ((4, 3, 2), 7), ((), 9)], ids=str)
def test_cross_entropy_shapes(device, kind, shape, classes):
    # Rows longer than a block, one class, (N, C, d1, d2) inputs (class dim not the last: copied to rows), and
    # unbatched (C,).
    for reduction in ("mean", "none"):
        _target_case(kind, shape)(device, torch.float64, shape, classes, weighted=True, smoothing=0.1,
                                  reduction=reduction)


@pytest.mark.parametrize("dtype,target_dtype", [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
                                                (torch.float16, torch.float32), (torch.float32, torch.float64)],
                         ids=str)
def test_cross_entropy_probabilities_dtypes_promote_as_torch(device, dtype, target_dtype):
    if dtype not in dtypes_for(device):
        pytest.skip("bfloat16 is checked on a GPU only")
    _soft_case(device, dtype, (33,), 50, weighted=True, smoothing=0.1, reduction="mean", target_dtype=target_dtype)


def test_cross_entropy_probabilities_launches_and_no_torch_softmax(device):
    x = torch.randn(8, 10, device=device, requires_grad=True)
    target = torch.softmax(torch.randn(8, 10, device=device), 1)
    with count_launches() as launches, TorchOpSpy() as spy:
        gpunn.CrossEntropyLoss(label_smoothing=0.1)(x, target).backward()
    assert launches == {"cross_entropy_probs_forward_kernel": 1, "reduced_loss_kernel": 1,
                        "cross_entropy_probs_backward_kernel": 1}
    assert not {"aten._log_softmax", "aten._softmax", "aten.logsumexp"} & set(spy.ops)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (2, 0, 5)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_probabilities_empty_like_torch(device, shape, reduction):
    # No rows or no classes: an empty sum per row, and a mean over no elements is NaN, as torch's.
    x = torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.rand(shape, device=device, dtype=torch.float64)
    ours, theirs = gpunn.losses.cross_entropy(x, target, reduction=reduction), F.cross_entropy(x, target,
                                                                                                reduction=reduction)
    assert ours.shape == theirs.shape
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    ours.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_over_no_classes_like_torch(device, reduction):
    # Only ignored targets are valid without classes; torch's losses are 0 (NaN for the mean over no weight).
    x = torch.randn(3, 0, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.full((3,), -100, device=device)
    ours, theirs = gpunn.losses.cross_entropy(x, target, reduction=reduction), F.cross_entropy(x, target,
                                                                                                reduction=reduction)
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.nan_to_num(), theirs.nan_to_num())


@pytest.mark.parametrize("kind", ["indices", "probabilities"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_keeps_its_precision_at_large_logits(device, kind, smoothing):
    # Logits near 1e4 in fp32: torch's x - max - log_sum keeps the precision of the row's spread; a loss or a
    # softmax formed from lse (rounded at 1e4) lost up to 2.6e-4 relative.
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(40, 300, generator=gen) + 1e4).to(device)
    target = (torch.randint(0, 300, (40,), generator=gen) if kind == "indices"
              else torch.softmax(torch.randn(40, 300, generator=gen), 1)).to(device)
    x, x64 = logits.clone().requires_grad_(), logits.double().requires_grad_()
    loss = gpunn.losses.cross_entropy(x, target, label_smoothing=smoothing, reduction="none")
    ref = F.cross_entropy(x64, target.double() if kind == "probabilities" else target, label_smoothing=smoothing,
                          reduction="none")
    assert_close(loss, ref, torch.float32, "loss")
    grad_out = torch.rand(40, generator=gen).to(device)
    assert_close(torch.autograd.grad(loss, x, grad_out)[0], torch.autograd.grad(ref, x64, grad_out.double())[0],
                 torch.float32, "grad")


def test_cross_entropy_infinite_and_nan_logits_like_torch(device):
    x = torch.randn(4, 5, device=device, dtype=torch.float64)
    x[0, 0], x[1, 2], x[2, 0] = -float("inf"), -float("inf"), float("nan")
    index = torch.tensor([1, 3, 0, 4], device=device)
    for target in (index, torch.softmax(torch.randn_like(x), 1)):
        for smoothing in (0.0, 0.1):
            ours = gpunn.losses.cross_entropy(x, target, label_smoothing=smoothing, reduction="none")
            theirs = F.cross_entropy(x, target, label_smoothing=smoothing, reduction="none")
            assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
            finite = theirs.isfinite()
            assert_close(ours[finite], theirs[finite], torch.float64, "loss")


def test_cross_entropy_ignores_what_ignored_rows_hold(device):
    # Rows whose target is ignore_index add nothing whatever their logits hold: a NaN, +inf, or all -inf (a
    # padded position masked with -inf). The loss of such a row is 0, and the sum and mean stay finite, as
    # torch's; they had come out NaN (0 * the row's NaN log-sum). Through a masked_fill, as padding is made,
    # the loss and the kept rows' gradients are torch's (masked_fill's backward zeroes the padded rows').
    classes = loss_kernels.BLOCK_C + 3  # the non-finite values in the second block of logits too
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, classes, generator=gen, dtype=torch.float64).to(device)
    x[1, 2] = float("nan")
    x[2, 0] = x[2, classes - 1] = float("inf")
    x[3, :] = -float("inf")
    x[4, loss_kernels.BLOCK_C + 1] = float("nan")
    target = torch.tensor([0, 7, 7, 7, 7, classes - 1], device=device)
    weight = torch.rand(classes, generator=gen, dtype=torch.float64).to(device)
    for class_weight in (None, weight):
        for smoothing in (0.0, 0.3):
            for reduction in ("none", "sum", "mean"):
                options = dict(weight=class_weight, ignore_index=7, label_smoothing=smoothing, reduction=reduction)
                ours = gpunn.losses.cross_entropy(x, target, **options)
                theirs = F.cross_entropy(x, target, **options)
                assert ours.isfinite().all() and theirs.isfinite().all()
                assert_close(ours, theirs, torch.float64, f"{reduction} loss")
    padded = torch.tensor([False, False, True, True, False, True], device=device)
    target = torch.tensor([1, 3, -100, -100, 2, -100], device=device)
    h = torch.randn(6, classes, generator=gen, dtype=torch.float64).to(device)
    results = []
    for cross_entropy in (gpunn.losses.cross_entropy, F.cross_entropy):
        leaf = h.clone().requires_grad_()
        loss = cross_entropy(leaf.masked_fill(padded[:, None], -float("inf")), target, label_smoothing=0.1)
        results.append((loss, *torch.autograd.grad(loss, leaf)))
    assert results[0][0].isfinite() and results[0][1].isfinite().all()
    for ours, theirs, what in zip(*results, ("loss", "grad")):
        assert_close(ours, theirs, torch.float64, what)


def test_cross_entropy_row_opening_with_a_block_of_minus_inf(device):
    # The online logsumexp's first blocks (BLOCK_C logits each) all -inf, as a restricted vocabulary masks
    # them: the loss and gradient are torch's, not NaN. (Class indices: with probabilities or smoothing torch
    # itself gives NaN or inf for any -inf logit, 0 * -inf, and gpunn matches it, as tested above.)
    classes = 2 * loss_kernels.BLOCK_C + 5
    x = torch.randn(3, classes, device=device, dtype=torch.float64)
    x[:2, :classes - 7] = -float("inf")
    target = torch.tensor([classes - 1, classes - 3, 0], device=device)
    weight = torch.rand(classes, device=device, dtype=torch.float64)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = gpunn.losses.cross_entropy(ours_x, target, weight, reduction="none")
    theirs = F.cross_entropy(ref_x, target, weight, reduction="none")
    assert_close(ours, theirs, torch.float64, "loss")
    grad_out = torch.rand(3, device=device, dtype=torch.float64)
    assert_close(torch.autograd.grad(ours, ours_x, grad_out)[0], torch.autograd.grad(theirs, ref_x, grad_out)[0],
                 torch.float64, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", ["probabilities", "indices"])
def test_cross_entropy_of_masked_logits_of_no_weight(device, dtype, kind):
    # Logits masked with a huge finite negative value (-1e9, the dtype's min), in the first column and in a
    # later block, carrying no target mass (probabilities) or no class weight (indices, smoothed): torch's
    # loss, not the difference of two numbers near the mask's scale (the weighted sums had been taken relative
    # to each row's first logit: 0, negative or 1e31 came back in place of ~2).
    classes = loss_kernels.BLOCK_C + 9
    masked = [0, 3, loss_kernels.BLOCK_C + 2]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, classes, generator=gen, dtype=torch.float64)
    x[0, masked], x[1, masked], x[2, masked[1:]] = -1e9, torch.finfo(dtype).min, -1e9
    x = x.to(device, dtype)
    weight = None
    if kind == "probabilities":
        target = torch.rand(4, classes, generator=gen, dtype=torch.float64)
        target[:, masked] = 0
        target = (target / target.sum(1, keepdim=True)).to(device, dtype)
    else:
        target = torch.randint(4, classes - 1, (4,), generator=gen).to(device)
        weight = torch.rand(classes, generator=gen, dtype=torch.float64) + 0.1
        weight[masked] = 0
        weight = weight.to(device, dtype)
    ours_x, ref_x = x.clone().requires_grad_(), x.double().requires_grad_()
    ours = gpunn.losses.cross_entropy(ours_x, target, weight, label_smoothing=0.2, reduction="none")
    theirs = F.cross_entropy(ref_x, target.double() if kind == "probabilities" else target,
                             None if weight is None else weight.double(), label_smoothing=0.2, reduction="none")
    assert_close(ours, theirs, dtype, "loss")
    grad_out = torch.rand(4, generator=gen, dtype=torch.float64).to(device)
    assert_close(torch.autograd.grad(ours, ours_x, grad_out.to(dtype))[0],
                 torch.autograd.grad(theirs, ref_x, grad_out)[0], dtype, "grad")


@pytest.mark.parametrize("smoothing", [-0.3, float("nan")])
def test_cross_entropy_smoothing_of_zero_or_less_is_none_as_torch(device, smoothing):
    # torch checks label_smoothing <= 1 only, and smooths only for a positive value.
    x = torch.randn(5, 6, device=device, dtype=torch.float64)
    for target in (torch.randint(0, 6, (5,), device=device), torch.softmax(torch.randn_like(x), 1)):
        assert_close(gpunn.losses.cross_entropy(x, target, label_smoothing=smoothing),
                     F.cross_entropy(x, target, label_smoothing=smoothing), torch.float64, "loss")
        assert_close(gpunn.losses.cross_entropy(x, target, label_smoothing=smoothing),
                     F.cross_entropy(x, target), torch.float64, "loss")


def test_cross_entropy_probabilities_accept_a_negative_ignore_index(device):
    x = torch.randn(5, 6, device=device, dtype=torch.float64)
    soft = torch.softmax(torch.randn_like(x), 1)
    assert_close(gpunn.CrossEntropyLoss(ignore_index=-1)(x, soft), F.cross_entropy(x, soft, ignore_index=-1),
                 torch.float64, "loss")


def test_cross_entropy_refuses_weights_that_require_grad(device):
    # torch refuses them with class indices (RuntimeError) and differentiates them with probabilities, which gpunn
    # does not: refused (NotImplementedError) before any launch, not a gradient silently missing.
    x = torch.randn(5, 6, device=device)
    weight = torch.rand(6, device=device, requires_grad=True)
    index, soft = torch.randint(0, 6, (5,), device=device), torch.softmax(torch.randn_like(x), 1)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, index, weight)
    for target, error in ((index, RuntimeError), (soft, NotImplementedError)):
        with count_launches() as launches, pytest.raises(error):
            gpunn.losses.cross_entropy(x, target, weight)
        assert launches == {}
        with torch.no_grad():
            gpunn.losses.cross_entropy(x, target, weight)


def test_cross_entropy_probabilities_errors_match_torch(device):
    x = torch.randn(3, 4, device=device)
    soft = torch.softmax(torch.randn(3, 4, device=device), 1)
    cases = [(soft, dict(ignore_index=2)), (soft, dict(weight=torch.ones(3, device=device))),
             (soft, dict(label_smoothing=1.5)), (soft[:2], {}), (soft[:, :3], {}), (soft[:, 0], {}),
             (soft > 0.2, {}), (soft, dict(reduction="avg"))]
    for target, kwargs in cases:
        with pytest.raises(Exception) as expected:
            F.cross_entropy(x, target, **kwargs)
        with count_launches() as launches, raises_exactly(expected.type):
            gpunn.losses.cross_entropy(x, target, **kwargs)
        assert launches == {}


@pytest.mark.parametrize("shape", [(7, 1500), (1,)], ids=str)  # one element: a count of 1 (a GPU constant)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_matches_torch(device, reduction, shape):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    x64, y64 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    loss = gpunn.MSELoss(reduction=reduction)(x, y)
    ref = torch.nn.MSELoss(reduction=reduction)(x64, y64)
    assert_close(loss, ref, torch.float64, "loss")
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(device)
    for g, g64 in zip(torch.autograd.grad(loss, (x, y), grad_out), torch.autograd.grad(ref, (x64, y64), grad_out)):
        assert_close(g, g64, torch.float64, "grad")


def test_mse_broadcast_promotion_and_launches(device):
    x = torch.randn(4, 3, device=device, dtype=torch.float32, requires_grad=True)
    y = torch.randn(3, device=device, dtype=torch.float64)
    with pytest.warns(UserWarning), count_launches() as launches:
        loss = gpunn.losses.mse_loss(x, y)
        loss.backward()
    with pytest.warns(UserWarning):
        ref = F.mse_loss(x.detach().double(), y)
    assert loss.dtype == torch.float64
    assert_close(loss, ref, torch.float64, "loss")
    assert launches == {"mse_forward_kernel": 1, "reduced_loss_kernel": 1, "mse_backward_kernel": 1}
    # torch broadcasts before it promotes: a 0-dim operand's dtype counts as any other's.
    scalar = torch.tensor(0.5, device=device, dtype=torch.float64)
    for pair in ((x.detach(), scalar), (scalar, x.detach())):
        with pytest.warns(UserWarning):
            loss, ref = gpunn.losses.mse_loss(*pair), F.mse_loss(*pair)
        assert loss.dtype == ref.dtype == torch.float64
        assert_close(loss, ref, torch.float64, "loss with a 0-dim operand")


@pytest.mark.parametrize("target_dtype", [torch.float64, torch.int64])
def test_mse_warns_of_a_broadcast_once_as_torch(device, target_dtype):
    """Shapes that differ warn once, as torch's, on the kernels' path and on torch's (an integer target)."""
    import warnings
    x, y = torch.randn(3, device=device), torch.tensor([[1], [0], [1]], device=device, dtype=target_dtype)
    counts = []
    for loss in (gpunn.losses.mse_loss, F.mse_loss):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss(x, y)
        counts.append(sum("different to the input size" in str(w.message) for w in caught))
    assert counts == [1, 1]


def test_functional_losses_take_torchs_arguments_in_its_order(device):
    """torch's parameter order (so positional calls mean the same), and its deprecated size_average / reduce
    read as torch reads them, with its warning."""
    import inspect
    for name in ("cross_entropy", "mse_loss"):
        theirs = list(inspect.signature(getattr(F, name)).parameters)
        assert list(inspect.signature(getattr(gpunn.functional, name)).parameters)[:len(theirs)] == theirs
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 5, (6,), generator=gen)
    x, y, target = x.to(device), y.to(device), target.to(device)
    calls = [(lambda f: f.cross_entropy(x, target, None, None, int(target[0]))),  # ignore_index, positionally
             (lambda f: f.cross_entropy(x, target, None, None, -100, None, "sum", 0.2)),
             (lambda f: f.mse_loss(x, y, None, None, "sum"))]
    for call in calls:
        assert_close(call(gpunn.functional), call(F), torch.float64, "loss")
    for legacy in (dict(size_average=False), dict(reduce=False), dict(size_average=True, reduce=True)):
        for name, args in (("cross_entropy", (x, target)), ("mse_loss", (x, y))):
            with pytest.warns(UserWarning, match="deprecated"):
                ours = getattr(gpunn.functional, name)(*args, **legacy)
            with pytest.warns(UserWarning, match="deprecated"):
                theirs = getattr(F, name)(*args, **legacy)
            assert_close(ours, theirs, torch.float64, f"{name} {legacy}")
    with pytest.raises(NotImplementedError, match="weight"):
        gpunn.functional.mse_loss(x, y, weight=torch.ones_like(x))


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_losses_run_in_float32_under_autocast_as_torch(device, autocast_dtype):
    # torch autocasts cross_entropy and mse_loss to float32 (a float16 loss, scaled by a GradScaler, would
    # overflow): the same dtypes, and gpunn's kernels on the float32 inputs, against float64.
    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(6, 300, generator=gen) * 4).to(device, autocast_dtype).requires_grad_()
    target = torch.randint(0, 300, (6,), generator=gen).to(device)
    other = torch.randn(6, 300, generator=gen).to(device, autocast_dtype)
    weight = torch.rand(300, generator=gen).to(device, autocast_dtype)
    soft = torch.softmax(other.float(), 1).to(autocast_dtype)
    cases = [("cross_entropy", lambda f, x: f.cross_entropy(x, target, weight, label_smoothing=0.1)),
             ("cross_entropy_probs", lambda f, x: f.cross_entropy(x, soft, weight, label_smoothing=0.1)),
             ("mse_loss", lambda f, x: f.mse_loss(x, other))]
    for name, loss_of in cases:
        with torch.autocast(device.type, dtype=autocast_dtype), count_launches() as launches:
            ours = loss_of(gpunn.functional, logits)
            theirs = loss_of(F, logits)
        assert ours.dtype == theirs.dtype == torch.float32, name
        forward_kernel = {"cross_entropy": "cross_entropy_forward_kernel",
                          "cross_entropy_probs": "cross_entropy_probs_forward_kernel", "mse_loss": "mse_forward_kernel"}
        assert forward_kernel[name] in launches, (name, launches)
        x64 = logits.detach().double().requires_grad_()
        with torch.no_grad():
            weight64, other64 = weight.double(), other.double()  # the float32 casts of 16-bit values are exact
            soft64 = soft.double()
        expected = {"cross_entropy": lambda: F.cross_entropy(x64, target, weight64, label_smoothing=0.1),
                    "cross_entropy_probs": lambda: F.cross_entropy(x64, soft64, weight64, label_smoothing=0.1),
                    "mse_loss": lambda: F.mse_loss(x64, other64)}[name]()
        assert_close(ours, expected, torch.float32, f"{name} loss")
        grad, = torch.autograd.grad(ours, logits)
        grad64, = torch.autograd.grad(expected, x64)
        assert grad.dtype == autocast_dtype, name  # the cast's backward, as torch's
        assert_close(grad, grad64, autocast_dtype, f"{name} gradient")


def test_a_grad_scaler_takes_the_first_step_under_float16_autocast(device):
    # With a float16 loss (what gpunn's losses returned under autocast), backward's seed, the GradScaler's
    # scale of 65536, overflows float16: the first steps were skipped while the scale fell. In float32, as torch
    # computes it, the first step is taken (inputs small enough that no gradient overflows float16 at that scale).
    torch.manual_seed(3)
    layer = gpunn.Linear(12, 7, device=device)
    optimizer = gpunn.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device.type)
    x, target = 0.1 * torch.randn(5, 12, device=device), torch.randint(0, 7, (5,), device=device)
    before = layer.weight.detach().clone()
    with torch.autocast(device.type, dtype=torch.float16):
        logits = layer(x)
        loss = gpunn.CrossEntropyLoss()(logits, target) + gpunn.MSELoss()(logits, torch.ones_like(logits))
    assert loss.dtype == torch.float32
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 65536.0  # the step found no inf
    assert not torch.equal(layer.weight, before)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_output_gradient_of_second_order_ignores_padding_rows(device, reduction):
    """An ignored row of -inf logits (padding) adds exactly 0 to the output gradient's second-order gradient,
    as in torch (it had made it NaN: 0 * the row's NaN softmax); its logits' gradients are NaN, as torch's."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(device)
    x[2] = -float("inf")
    target = torch.tensor([1, 3, -100, 0], device=device)
    v = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(device)
    kept = torch.tensor([True, True, False, True], device=device)
    results = []
    for cross_entropy in (gpunn.losses.cross_entropy, F.cross_entropy):
        leaf = x.clone().requires_grad_()
        loss = cross_entropy(leaf, target, reduction=reduction, label_smoothing=0.1)
        seed = torch.ones_like(loss).requires_grad_()
        dx, = torch.autograd.grad(loss, leaf, seed, create_graph=True)
        results.append((loss.detach(), dx.detach(), *torch.autograd.grad((dx[kept] * v[kept]).sum(), (leaf, seed))))
    for ours, theirs, what in zip(*results, ("loss", "dx", "second order: logits", "second order: output gradient")):
        assert_same_values(ours, theirs, what)
    assert results[0][3].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_mse_mean_gradient_is_finite_where_torch_is(device, dtype):
    """The mean's gradient 2 (x - y) g / n, formed as torch's (2 / n) (x - y) g: 2 (x - y) g overflowed first."""
    big = torch.finfo(dtype).max * 0.4  # x - y = 0.8 max: twice that overflows, (2 / 4) times it does not
    x = torch.tensor([big, 1.0, 2.0, 3.0], dtype=dtype, device=device)
    y = torch.tensor([-big, 1.0, 1.0, 1.0], dtype=dtype, device=device)
    grads = []
    for mse_loss in (gpunn.losses.mse_loss, F.mse_loss):
        leaf = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(mse_loss(leaf, y, reduction="mean"), leaf)[0])
    assert grads[1].isfinite().all()
    assert_same_values(*grads, "dx")
