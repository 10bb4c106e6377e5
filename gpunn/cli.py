"""gpunn's command line: `gpunn train` trains three networks of gpunn layers beside the same torch ones;
`gpunn check` checks gpunn's numerics against a float64 torch reference."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

NETWORKS = ("mlp", "local", "rnn")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text}")
    return value


def _seed(text: str) -> int:
    """A seed torch's generators take with room to spare: the check offsets it per case, training by one."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 2**62:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**62, got {text}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpunn", description="gpunn: neural-network layers as hand-written Triton kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train networks of gpunn layers beside the same torch.nn networks",
        description="Train three networks on handwritten digits, each built from gpunn layers and trained with "
                    "gpunn's cross-entropy and SGD kernels, side by side with the same network in plain torch "
                    "(same initial weights and batches, torch's loss and SGD): an MLP of gpunn.Linear layers "
                    "(fused activations); a locally connected network (a LocallyConnected2d, then a MaskedLinear "
                    "over 3x3 neighbourhoods of its maps); an RNN that reads each image row by row. Prints per-epoch "
                    "loss and accuracy of each, writes a loss-curve PNG, and ends with a summary line per "
                    "network with its test accuracy and the largest loss gap between gpunn and torch. Runs "
                    "compiled on a CUDA GPU, otherwise through Triton's interpreter on the CPU.")
    train.add_argument("--epochs", type=_at_least_one, default=3, help="passes over the training set (default 3)")
    train.add_argument("--batch-size", type=_at_least_one, default=128, help="examples per SGD step (default 128)")
    train.add_argument("--lr", type=_non_negative, default=0.1, help="SGD learning rate (default 0.1)")
    train.add_argument("--momentum", type=_non_negative, default=0.9, help="SGD momentum (default 0.9)")
    train.add_argument("--data", default=None, metavar="FILE.npz",
                       help="an .npz with X (N, features), finite, and y (N,) or (N, 1) class labels (default: "
                            "scikit-learn's 8x8 digits, shipped inside its package; the local and rnn networks "
                            "need square images)")
    train.add_argument("--networks", default=None,
                       help=f"comma-separated networks to train, from: {', '.join(NETWORKS)} (default: all, with "
                            f"local and rnn skipped where the features are not a square image; named here, a network "
                            f"the data cannot run is an error)")
    train.add_argument("--plot", default="gpunn-train-loss.png", help="where to write the loss curves "
                                                                      "(default gpunn-train-loss.png)")
    train.add_argument("--seed", type=_seed, default=0, help="seed for the split, batches and weights (default 0)")
    train.add_argument("--device", default=None,
                       help="torch device (default: cuda if available, else cpu through the interpreter)")
    check = commands.add_parser(
        "check", help="check gpunn's numerics on this machine against a float64 torch reference",
        description="For each op (linear with every activation, masked_linear, locally_connected1d/2d, rnn_cell, "
                    "rnn, cross_entropy, mse_loss, sgd, double_backward), dtype and a few odd-sized cases: the "
                    "relative error "
                    "||gpunn - ref|| / ||ref|| of the outputs (forward) and of every input's and parameter's "
                    "gradient (backward) against torch in float64 on the same rounded inputs, beside torch's own "
                    "error at the same dtype. Prints a pass/fail table; exits 1 if any check fails. Runs compiled "
                    "on a CUDA GPU (dtypes fp64, fp32 (IEEE), tf32, fp16, bf16), otherwise through Triton's "
                    "interpreter on the CPU (fp64, fp32, fp16).")
    check.add_argument("--quick", action="store_true", help="one to three cases per op instead of all")
    check.add_argument("--ops", default=None, metavar="LIST", help="comma-separated ops to check (default: all)")
    check.add_argument("--dtypes", default=None, metavar="LIST",
                       help="comma-separated, from fp64, fp32, tf32, fp16, bf16 (default: all the device runs)")
    check.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    check.add_argument("--seed", type=_seed, default=0,
                       help="seed for the inputs (default 0): a case's inputs depend on it and the case alone, not on "
                            "what else is selected")
    check.add_argument("--out", default=None, metavar="FILE.md", help="also write the table to this file")
    for command in (train, check):
        command.set_defaults(command_parser=command)  # errors in a command's options show its own usage
    return parser


def _names(parser, option: str, text: str | None, allowed) -> list[str] | None:
    """A comma-separated option as a list, each name checked against `allowed` and given once; None when not
    given."""
    if text is None:
        return None
    names = list(dict.fromkeys(name for name in text.split(",") if name))
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
        parser.error(f"{option}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}")
    return names


def _device(parser, text: str | None):
    """--device as a torch.device (None: the default), refused as an argparse error where torch cannot use it."""
    import torch

    if text is None:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        parser.error(f"--device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {text}: this torch has no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {text}: gpunn runs on cpu or cuda")
    return device


def _output_file(parser, option: str, path: str | None) -> None:
    """Refuse, before any work, an output file path that is a directory or whose directory does not exist."""
    if path is None:
        return
    if Path(path).is_dir():
        parser.error(f"{option} {path}: a directory, not a file")
    if not Path(path).resolve().parent.is_dir():
        parser.error(f"{option} {path}: no directory {Path(path).parent}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parser = args.command_parser
    device = _device(parser, args.device)
    if args.command == "check":
        _output_file(parser, "--out", args.out)
        from . import check

        return check.main(device, args.quick, _names(parser, "--ops", args.ops, check.OPS),
                          _names(parser, "--dtypes", args.dtypes, check.PRECISIONS), args.seed, args.out)
    if args.command == "train":
        _output_file(parser, "--plot", args.plot)
        networks = _names(parser, "--networks", args.networks, NETWORKS)
        from .train import train

        return train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                     data=args.data, only=networks, plot_path=args.plot, seed=args.seed, device=device)
    return 2
