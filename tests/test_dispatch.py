"""Where gpunn's ops run: Triton (CUDA or the CPU interpreter) or plain torch on CPU otherwise."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

import gpunn
from gpunn.kernels import runtime


def test_this_session_runs_triton(device):
    assert runtime.triton_runs_on(device)
    assert runtime.INTERPRET == (device.type == "cpu")


def test_cpu_without_interpreter_uses_plain_torch():
    # A fresh process without TRITON_INTERPRET: CPU tensors take the plain-torch path, same results.
    script = textwrap.dedent("""
        import torch, gpunn
        from gpunn.kernels import launch_counts, runtime
        assert not runtime.INTERPRET
        torch.manual_seed(0)
        layer = gpunn.Linear(9, 4, activation="gelu")
        ref = torch.nn.Linear(9, 4)
        ref.load_state_dict(layer.state_dict())
        x = torch.randn(5, 9, requires_grad=True)
        out = layer(x)
        out.sum().backward()
        expected = torch.nn.functional.gelu(ref(x.detach()))
        assert torch.allclose(out, expected), (out - expected).abs().max()
        assert layer.weight.grad is not None
        mask = gpunn.masks.local_1d(9, 4, 3)
        masked = gpunn.MaskedLinear(9, 4, mask, activation="tanh")
        with torch.no_grad():
            masked.weight[~mask] = float("nan")
        out = masked(x)
        out.sum().backward()
        expected = torch.tanh(torch.nn.functional.linear(x.detach(), masked.weight.detach().masked_fill(~mask, 0),
                                                         masked.bias.detach()))
        assert torch.allclose(out, expected), (out - expected).abs().max()
        assert (masked.weight.grad[~mask] == 0).all()
        local = gpunn.LocallyConnected2d(2, 3, (4, 5), 3, padding=1)
        image = torch.randn(2, 2, 4, 5, requires_grad=True)
        out = local(image)
        out.sum().backward()
        patches = torch.nn.functional.unfold(image.detach(), 3, padding=1)  # (N, 18, 20)
        expected = torch.einsum("nrl,olr->nol", patches, local.weight.detach().reshape(3, 20, 18))
        expected = (expected + local.bias.detach().reshape(3, 20)).reshape(2, 3, 4, 5)
        assert torch.allclose(out, expected, atol=1e-6), (out - expected).abs().max()
        assert image.grad is not None and local.weight.grad is not None
        cell, reference_cell = gpunn.RNNCell(9, 6), torch.nn.RNNCell(9, 6)
        reference_cell.load_state_dict(cell.state_dict())
        hidden = torch.randn(5, 6)
        assert torch.allclose(cell(x.detach(), hidden), reference_cell(x.detach(), hidden), atol=1e-6)
        assert torch.allclose(cell(x.detach()), reference_cell(x.detach()), atol=1e-6)
        assert launch_counts() == {}, launch_counts()
        print("plain torch ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "plain torch ok" in result.stdout


def test_import_is_lazy():
    # `import gpunn` must not import triton: the CLI picks the interpreter first on CPU-only machines.
    code = "import sys, gpunn; assert 'triton' not in sys.modules, 'triton imported eagerly'; print(gpunn.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == gpunn.__version__
    assert isinstance(gpunn.Linear(2, 2), torch.nn.Linear)


def test_every_public_submodule_loads_on_first_use():
    # In a fresh process, each name of gpunn.__all__ resolves by attribute access alone (gpunn.reference had
    # needed an import of its own).
    code = "import gpunn; print(all(getattr(gpunn, name) is not None for name in gpunn.__all__))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
