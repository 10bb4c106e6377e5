"""gpunn's command line: `gpunn train` trains a network of gpunn layers beside the same torch.nn one."""
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpunn", description="gpunn: neural-network layers as hand-written Triton kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train an MLP of gpunn.Linear layers beside the same torch.nn model",
        description="Train a small MLP of gpunn.Linear layers (fused activations) on a synthetic "
                    "three-class spiral dataset, side by side with the same torch.nn model from the same "
                    "initial weights, and report per-epoch loss and accuracy of both and the largest "
                    "loss gap between them. Runs compiled on a CUDA GPU, otherwise through Triton's "
                    "interpreter on the CPU.")
    train.add_argument("--epochs", type=int, default=6, help="passes over the training set (default 6)")
    train.add_argument("--batch-size", type=int, default=64, help="examples per SGD step (default 64)")
    train.add_argument("--lr", type=float, default=0.3, help="SGD learning rate (default 0.3)")
    train.add_argument("--hidden", type=int, default=64, help="width of the two hidden layers (default 64)")
    train.add_argument("--samples", type=int, default=3000, help="training examples (default 3000)")
    train.add_argument("--seed", type=int, default=0, help="seed for data and initial weights (default 0)")
    train.add_argument("--device", default=None,
                       help="torch device (default: cuda if available, else cpu through the interpreter)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .demo import train

        return train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, hidden=args.hidden,
                     samples=args.samples, seed=args.seed, device=args.device)
    return 2
