"""gpunn's command line: `gpunn train` trains three networks of gpunn layers beside the same torch ones."""
from __future__ import annotations

import argparse

NETWORKS = ("mlp", "local", "rnn")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpunn", description="gpunn: neural-network layers as hand-written Triton kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train networks of gpunn layers beside the same torch.nn networks",
        description="Train three networks on handwritten digits, each built from gpunn layers and trained with "
                    "gpunn's cross-entropy and SGD kernels, side by side with the same network in plain torch "
                    "(same initial weights and batches, torch's loss and SGD): an MLP of gpunn.Linear layers "
                    "(fused activations); a locally connected network (a MaskedLinear with 3x3 neighbourhoods, "
                    "then a LocallyConnected2d); an RNN that reads each image row by row. Prints per-epoch "
                    "loss and accuracy of each, writes a loss-curve PNG, and ends with a summary line per "
                    "network with its test accuracy and the largest loss gap between gpunn and torch. Runs "
                    "compiled on a CUDA GPU, otherwise through Triton's interpreter on the CPU.")
    train.add_argument("--epochs", type=int, default=3, help="passes over the training set (default 3)")
    train.add_argument("--batch-size", type=int, default=128, help="examples per SGD step (default 128)")
    train.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    train.add_argument("--data", default=None, metavar="FILE.npz",
                       help="an .npz with X (N, features) and y (N,) labels (default: scikit-learn's 8x8 "
                            "digits, shipped inside its package; the local and rnn networks need square images)")
    train.add_argument("--networks", default=",".join(NETWORKS),
                       help=f"comma-separated networks to train, from: {', '.join(NETWORKS)} (default: all)")
    train.add_argument("--plot", default="gpunn-train-loss.png", help="where to write the loss curves "
                                                                      "(default gpunn-train-loss.png)")
    train.add_argument("--seed", type=int, default=0, help="seed for the split, batches and weights (default 0)")
    train.add_argument("--device", default=None,
                       help="torch device (default: cuda if available, else cpu through the interpreter)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        networks = [name for name in args.networks.split(",") if name]
        unknown = sorted(set(networks) - set(NETWORKS))
        if unknown:
            parser.error(f"--networks: unknown {', '.join(unknown)}; choose from {', '.join(NETWORKS)}")
        from .train import train

        return train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                     data=args.data, only=networks, plot_path=args.plot, seed=args.seed, device=args.device)
    return 2
