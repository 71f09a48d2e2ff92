"""The command line: ``fastbp train | bench | info`` (also ``python -m fastbp``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from . import datasets
from .activations import ACTIVATIONS
from .dtypes import FLOAT_DTYPES
from .optim import OPTIMIZERS


class UsageError(Exception):
    """A user mistake: reported in one line with exit code 2."""


def _hidden_sizes(text: str) -> list[int]:
    """Layer widths like '128,64' (commas or spaces), each positive."""
    try:
        sizes = [int(s) for s in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"sizes must be integers like '128,64', got {text!r}") from exc
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}") from exc
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from exc
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (and exit code 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="fastbp", description="Fast backpropagation for MLPs.")
    parser.add_argument("--version", action="version", version=f"fastbp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train an MLP (default: the bundled digits)")
    train.add_argument("--data", help="data file: .npz (X, y), .csv (labels in --label-column) or IDX images")
    train.add_argument("--labels", help="IDX label file, with IDX images in --data")
    train.add_argument("--label-column", default="-1", help="CSV label column: index or name (default -1)")
    train.add_argument("--hidden", type=_hidden_sizes, default=[128, 64], help="hidden sizes (default 128,64)")
    train.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    train.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (default 1e-3)")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD/RMSProp momentum (default 0.9)")
    train.add_argument("--epochs", type=_positive_int, default=30)
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument("--backend", default="auto", help="numpy | numba | cupy | auto (default)")
    train.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32")
    train.add_argument("--seed", type=_seed, default=0, help="seed of the split, the weights and the shuffling")
    train.add_argument("--test-size", type=float, default=0.25, help="held-out fraction (default 0.25)")
    train.add_argument("--preprocess", choices=("auto", "none", "standardize", "scale"), default="auto",
                       help="auto: pixels/16 for digits, /255 for IDX, standardize other files")
    train.add_argument("--save", metavar="FILE", help="save the trained model (.npz)")
    train.add_argument("--plot", metavar="FILE", help="save loss and accuracy curves as PNG (needs matplotlib)")
    train.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    train.add_argument("--checkpoint", metavar="FILE",
                       help="write a training checkpoint (.npz) at the end, and on Ctrl-C")
    train.add_argument("--resume", metavar="FILE",
                       help="continue from a checkpoint for --epochs more epochs (its model and optimizer "
                            "replace --hidden, --activation, --optimizer, --lr, --dtype)")

    info = sub.add_parser("info", help="versions, backends, BLAS, threads, GPU")
    info.add_argument("--json", action="store_true", help="print JSON")

    from .bench import add_bench_parser

    add_bench_parser(sub, _hidden_sizes)
    return parser


def _load_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str, float | None]:
    """(X, y, description, scale divisor or None)."""
    if args.data is None:
        X, y = datasets.load_digits()
        return X, y, "digits (bundled)", 16.0
    label_column: Any = args.label_column
    try:
        label_column = int(label_column)
    except ValueError:
        pass
    X, y = datasets.load_file(args.data, labels=args.labels, label_column=label_column)
    lower = args.data.lower()
    return X, y, args.data, 255.0 if ("idx" in lower or "ubyte" in lower) else None


def cmd_train(args: argparse.Namespace) -> int:
    import fastbp as fb

    from .io import save_model

    wall = time.perf_counter()
    backend = fb.set_backend(args.backend)
    print(f"backend: {backend.name} (available: {', '.join(fb.available_backends())})")
    warmup = getattr(backend, "warmup", None)
    if warmup is not None:
        seconds = warmup(dtypes=[args.dtype], activations=[args.activation])
        print(f"compile: {seconds:.2f} s (JIT kernels, cached on disk for the next run; not in training time)")
    X, y, source, divisor = _load_data(args)
    if y.dtype.kind != "i":
        raise UsageError(f"fastbp train classifies: the labels of {source} must be integers")
    classes = int(y.max()) + 1
    if y.min() < 0:
        raise UsageError(f"labels of {source} must be non-negative integers, got min {y.min()}")
    if not 0 < args.test_size < 1:
        raise UsageError(f"--test-size must be in (0, 1), got {args.test_size}")
    X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, test_size=args.test_size, seed=args.seed)
    mode = args.preprocess
    if mode == "auto":
        mode = "scale" if divisor is not None else "standardize"
    if mode == "scale":
        d = divisor if divisor is not None else max(float(np.abs(X_train).max()), 1.0)
        X_train, X_test = X_train / d, X_test / d
    elif mode == "standardize":
        X_train, X_test = datasets.standardize(X_train, X_test)
    print(f"data: {source}: {X.shape[0]} samples, {X.shape[1]} features, {classes} classes; "
          f"train {len(y_train)}, test {len(y_test)}; preprocessing: {mode}")

    if args.resume:
        trainer = fb.Trainer.load_checkpoint(args.resume, backend=backend)
        model = trainer.model
        if model.sizes[0] != X.shape[1] or model.sizes[-1] < classes:
            raise UsageError(f"checkpoint {args.resume} holds a {model.sizes} network; the data has "
                             f"{X.shape[1]} features and {classes} classes")
        print(f"resumed from {args.resume} at epoch {trainer.epoch}")
    else:
        model = fb.MLP([X.shape[1], *args.hidden, classes], activation=args.activation, dtype=args.dtype,
                       seed=args.seed)
        kwargs: dict[str, Any] = {"lr": args.lr}
        if args.optimizer in ("sgd", "rmsprop"):
            kwargs["momentum"] = args.momentum
        trainer = fb.Trainer(model, loss="cross_entropy", optimizer=OPTIMIZERS[args.optimizer](**kwargs),
                             batch_size=args.batch_size, seed=args.seed)
    print(f"model: {model.sizes} {model.activations[0]}, {model.n_params} parameters, {model.dtype.name}; "
          f"{type(trainer.optimizer).__name__} lr {trainer.optimizer.lr:g}, batch {trainer.batch_size}, "
          f"{args.epochs} epochs")
    if args.checkpoint:
        from .io import check_writable

        check_writable(args.checkpoint, "--checkpoint")
    progress = "none" if args.quiet else ("auto" if sys.stderr.isatty() else "lines")
    start = time.perf_counter()
    history = trainer.fit(X_train, y_train, epochs=args.epochs, validation_data=(X_test, y_test),
                          progress=progress, interrupt_checkpoint=args.checkpoint)
    train_time = time.perf_counter() - start
    if history.interrupted:
        saved = f"; checkpoint in {args.checkpoint}" if args.checkpoint else ""
        print(f"interrupted: {len(history)} epochs completed{saved}", file=sys.stderr)
    elif args.checkpoint:
        print(f"saved checkpoint to {trainer.save_checkpoint(args.checkpoint)}")
    result = trainer.evaluate(X_test, y_test)
    print(f"test loss: {result['loss']:.4f}")
    print(f"test accuracy: {result['accuracy']:.3f}")
    if args.save:
        print(f"saved model to {save_model(model, args.save)}")
    if args.plot:
        _plot(history, args.plot)
        print(f"saved plot to {args.plot}")
    epoch_time = sum(history["time"])
    print(f"training time: {epoch_time:.2f} s in {len(history)} epochs (fit {train_time:.2f} s, "
          f"wall {time.perf_counter() - wall:.2f} s)")
    return 130 if history.interrupted else 0


def _plot(history: Any, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'fastbp[plot]'") from exc
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"]
    for key in ("loss", "val_loss"):
        if key in history.keys():
            ax_loss.plot(epochs, history[key], label=key)
    for key in ("accuracy", "val_accuracy"):
        if key in history.keys():
            ax_acc.plot(epochs, history[key], label=key)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_info(args: argparse.Namespace) -> int:
    from .envinfo import environment, format_environment

    env = environment()
    if args.json:
        import json

        print(json.dumps(env, indent=2, default=str))
    else:
        print(format_environment(env))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"train": cmd_train, "info": cmd_info, "bench": _cmd_bench}
    try:
        return commands[args.command](args)
    except (UsageError, ValueError, TypeError, OSError) as exc:
        message = " ".join(str(exc).split())  # one line
        print(f"fastbp {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastbp {args.command}: interrupted", file=sys.stderr)
        return 130


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import cmd_bench

    return cmd_bench(args)
