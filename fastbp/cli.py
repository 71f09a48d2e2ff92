"""The command line: ``fastbp train | predict | evaluate | bench | info`` (also ``python -m fastbp``).

Every expected failure (a bad option, a missing file, a diverging run) is one line on stderr and exit
code 2; every option, path and optional dependency is checked before anything is compiled or trained.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from . import datasets
from .activations import ACTIVATIONS
from .dtypes import FLOAT_DTYPES, HALF_DTYPES
from .losses import LOSSES
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

    formatter = argparse.ArgumentDefaultsHelpFormatter
    train = sub.add_parser("train", help="train an MLP (default: the bundled digits)", formatter_class=formatter)
    _data_options(train)
    train.add_argument("--loss", choices=LOSSES, default="cross_entropy",
                       help="cross_entropy: class labels; binary_cross_entropy: 0/1 targets; mse: regression")
    train.add_argument("--hidden", type=_hidden_sizes, default=[128, 64], help="hidden sizes")
    train.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu", type=str.lower,
                       help="hidden layers' activation")
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam", type=str.lower,
                       help="optimizer, with torch.optim's defaults but --lr and --momentum")
    train.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD/RMSProp momentum")
    train.add_argument("--epochs", type=_positive_int, default=30, help="passes over the training rows")
    train.add_argument("--batch-size", type=_positive_int, default=64, help="rows per step")
    train.add_argument("--backend", default="auto", help="numpy | numba | cupy | cupy:N | auto")
    train.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32", help="the weights' dtype")
    train.add_argument("--compute-dtype", choices=HALF_DTYPES, default=None,
                       help="mixed precision on the cupy backend: compute in 16 bits over float32 weights")
    train.add_argument("--epilogues", choices=("kernels", "cublaslt"), default="kernels",
                       help="on the cupy backend: the work around the GEMMs in fastbp's kernels, or fused into "
                            "them by cuBLASLt (relu, gelu, the bias and its gradient)")
    train.add_argument("--fused-mlp", action="store_true",
                       help="on the cupy backend, each step's forward and backward in one kernel where the network "
                            "allows (float32, float64, bfloat16; one hidden activation, cross-entropy, narrow layers)")
    train.add_argument("--cuda-graphs", action="store_true",
                       help="on the cupy backend, replay each step as a captured CUDA graph (one launch a step)")
    train.add_argument("--seed", type=_seed, default=0, help="seed of the split, the weights and the shuffling")
    train.add_argument("--test-size", type=_fraction, default=0.25,
                       help="fraction held out as the test set, evaluated once at the end")
    train.add_argument("--val-split", type=_fraction_or_zero, default=0.0,
                       help="fraction of the training rows held out as validation data, evaluated after each "
                            "epoch (0: none)")
    train.add_argument("--class-weight", choices=("none", "balanced"), default="none", type=str.lower,
                       help="balanced: weigh each class by n_rows / (n_classes * its count), for imbalanced "
                            "classes (classification losses with one label per row)")
    train.add_argument("--preprocess", choices=("auto", "none", "standardize", "scale"), default="auto",
                       help="auto: pixels/16 for digits, /255 for IDX, standardize other files")
    train.add_argument("--save", metavar="FILE", help="save the trained model (.npz)")
    train.add_argument("--plot", metavar="FILE", help="save loss and accuracy curves as PNG (needs matplotlib)")
    train.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    train.add_argument("--checkpoint", metavar="FILE",
                       help="write a training checkpoint (.npz) at the end, and on Ctrl-C")
    train.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                       help="also write the --checkpoint every N epochs (what a killed job resumes from)")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel training over the ranks of an MPI job (mpiexec -n K fastbp train "
                            "--distributed ...): --batch-size is the global batch; needs fastbp[mpi]")
    train.add_argument("--resume", metavar="FILE",
                       help="continue from a checkpoint for --epochs more epochs (its model and optimizer "
                            "replace --hidden, --activation, --optimizer, --lr, --dtype)")

    predict = sub.add_parser("predict", help="predictions of a saved model", formatter_class=formatter)
    predict.add_argument("--model", required=True, metavar="FILE", help="a model saved by train --save")
    predict.add_argument("--data", required=True, metavar="FILE",
                         help="features: .npz (array X), .csv (every column a feature unless --label-column) "
                              "or IDX images")
    predict.add_argument("--label-column", default=None, help="CSV column to leave out (index or name)")
    predict.add_argument("--out", metavar="FILE", help="write the predictions as CSV, one row per sample "
                                                        "(default: print them)")
    predict.add_argument("--proba", action="store_true", help="class probabilities instead of labels")
    predict.add_argument("--backend", default="auto", help="numpy | numba | cupy | cupy:N | auto")

    evaluate = sub.add_parser("evaluate", help="loss and accuracy of a saved model on labelled data",
                              formatter_class=formatter)
    evaluate.add_argument("--model", required=True, metavar="FILE", help="a model saved by train --save")
    _data_options(evaluate, required=True)
    evaluate.add_argument("--backend", default="auto", help="numpy | numba | cupy | cupy:N | auto")

    export = sub.add_parser("export", help="a saved model as ONNX, for ONNX Runtime and other servers",
                            formatter_class=formatter)
    export.add_argument("--model", required=True, metavar="FILE", help="a model saved by train --save")
    export.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset version (>= 13)")
    export.add_argument("--no-probabilities", action="store_true",
                        help="logits only (a classifier's graph also outputs probabilities by default)")

    info = sub.add_parser("info", help="versions, backends, BLAS, threads, GPU")
    info.add_argument("--json", action="store_true", help="print JSON")

    from .bench import add_bench_parser

    add_bench_parser(sub, _hidden_sizes)
    return parser


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from exc
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def _fraction_or_zero(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _fraction(text)


def _data_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--data", required=required, metavar="FILE",
                        help="data file: .npz (X, y), .csv (labels in --label-column) or IDX images"
                             + ("" if required else " (default: the bundled digits)"))
    parser.add_argument("--labels", metavar="FILE", help="IDX label file, with IDX images in --data")
    parser.add_argument("--label-column", default="-1", help="CSV label column: index or name")


def _label_column(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _check_file(path: str | None, option: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"{option} {path!r} does not exist or is not a file")


def _load_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str, float | None]:
    """(X, y, description, scale divisor or None); errors name the file."""
    if args.data is None:
        X, y = datasets.load_digits()
        return X, y, "digits (bundled)", 16.0
    _check_file(args.data, "--data")
    _check_file(args.labels, "--labels")
    try:
        X, y = datasets.load_file(args.data, labels=args.labels, label_column=_label_column(args.label_column))
    except (ValueError, TypeError, OSError) as exc:
        message = str(exc)
        raise UsageError(message if args.data in message else f"--data {args.data!r}: {message}") from exc
    lower = args.data.lower()
    return X, y, args.data, 255.0 if ("idx" in lower or "ubyte" in lower) else None


def _check_outputs(args: argparse.Namespace) -> None:
    """Every file train will write can be written, and --plot can plot, before any work is done."""
    from .io import check_writable

    for option in ("save", "checkpoint"):
        if getattr(args, option):
            check_writable(getattr(args, option), f"--{option}")
    if args.plot:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            raise UsageError(f"--plot {args.plot!r}: folder {folder!r} does not exist")
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise UsageError("--plot needs matplotlib: pip install 'fastbp[plot]'") from exc
    _check_file(args.resume, "--resume")


def _preprocess(mode: str, divisor: float | None, X_train: np.ndarray) -> dict[str, Any]:
    """The input preprocessing, fitted on the training rows (saved with the model for fastbp predict)."""
    if mode == "auto":
        mode = "scale" if divisor is not None else "standardize"
    if mode == "scale":
        return {"mode": "scale", "divisor": divisor if divisor is not None else max(float(np.abs(X_train).max()), 1.0)}
    if mode == "standardize":
        s = datasets.Standardizer().fit(X_train)
        return {"mode": "standardize", "mean": s.mean.tolist(), "std": s.std.tolist()}  # type: ignore[union-attr]
    return {"mode": "none"}


def apply_preprocess(spec: dict[str, Any] | None, X: np.ndarray) -> np.ndarray:
    """``X`` transformed as the model's training data was (``_preprocess``); as it is without one."""
    if not spec or spec.get("mode") == "none":
        return X
    if spec["mode"] == "scale":
        return X / spec["divisor"]
    mean, std = np.asarray(spec["mean"]), np.asarray(spec["std"])
    if X.shape[1] != mean.shape[0]:
        raise UsageError(f"the data has {X.shape[1]} features; the model was trained on {mean.shape[0]}")
    return (X - mean) / std


def _n_outputs(loss: str, y: np.ndarray, source: str) -> int:
    if loss == "cross_entropy":
        if y.ndim != 1:
            raise UsageError(f"--loss cross_entropy needs one class label per row; {source} has y of shape {y.shape}")
        return len(np.unique(y))
    if y.dtype.kind == "U":
        raise UsageError(f"--loss {loss} needs numeric targets; {source} has text labels")
    return 1 if y.ndim == 1 else y.shape[1]


def cmd_train(args: argparse.Namespace) -> int:
    import fastbp as fb

    wall = time.perf_counter()
    _check_outputs(args)  # before anything is loaded, compiled or trained
    if args.checkpoint_every and not args.checkpoint:
        raise UsageError("--checkpoint-every needs --checkpoint FILE")
    comm = _communicator() if args.distributed else None
    X, y, source, divisor = _load_data(args)
    n_out = _n_outputs(args.loss, y, source)
    if args.class_weight != "none" and not (args.loss == "cross_entropy" or (args.loss == "binary_cross_entropy"
                                                                            and n_out == 1)):
        raise UsageError(f"--class-weight needs classes: --loss cross_entropy, or binary_cross_entropy with one "
                         f"0/1 target per row ({source} has {n_out} targets for {args.loss})")
    stratify = args.loss == "cross_entropy"
    X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, test_size=args.test_size, seed=args.seed,
                                                                 stratify=stratify)
    if args.val_split:
        X_train, X_val, y_train, y_val = datasets.train_test_split(X_train, y_train, test_size=args.val_split,
                                                                   seed=args.seed, stratify=stratify)
    spec = _preprocess(args.preprocess, divisor, X_train)
    X_train, X_test = apply_preprocess(spec, X_train), apply_preprocess(spec, X_test)
    validation = (apply_preprocess(spec, X_val), y_val) if args.val_split else None
    what = f"{n_out} classes" if args.loss == "cross_entropy" else f"{n_out} targets"
    print(f"data: {source}: {X.shape[0]} samples, {X.shape[1]} features, {what}; train {len(y_train)}, "
          f"validation {0 if validation is None else len(validation[1])}, test {len(y_test)}; "
          f"preprocessing: {spec['mode']}")

    backend = fb.set_backend(args.backend)
    if comm is not None:
        backend = fb.set_backend(_rank_device(args.backend, backend, comm))
    print(f"backend: {backend.name} (available: {', '.join(fb.available_backends())})")
    if args.epilogues != "kernels":
        if not hasattr(backend, "set_epilogues"):
            raise UsageError(f"--epilogues {args.epilogues} needs the cupy backend, not {backend.name}")
        try:
            backend.set_epilogues(args.epilogues)
        except Exception as exc:
            raise UsageError(f"--epilogues {args.epilogues}: {exc}") from exc
        print(f"epilogues: {args.epilogues}")
    fused_route = None  # why a step of the model does not run fused (set_fused_mlp), with --fused-mlp
    if args.fused_mlp:
        if not hasattr(backend, "set_fused_mlp"):
            raise UsageError(f"--fused-mlp needs the cupy backend, not {backend.name}")
        backend.set_fused_mlp(True)
        fused_route = backend.fused_mlp_route  # type: ignore[attr-defined]  # the cupy backend's, as set_fused_mlp
    if comm is not None:
        comm = fb.distributed.init("auto", backend, mpi=comm)
        print(f"data-parallel: {comm.size} ranks over {comm.name}; global batch {args.batch_size}")
    if args.resume:
        trainer = fb.Trainer.load_checkpoint(args.resume, backend=backend, comm=comm)
        trainer.cuda_graphs = args.cuda_graphs  # how steps run, not what they compute: not in checkpoints
        model = trainer.model
        if model.sizes[0] != X.shape[1] or model.sizes[-1] != n_out or trainer.loss != args.loss:
            raise UsageError(f"checkpoint {args.resume} holds a {model.sizes} network trained with {trainer.loss}; "
                             f"the data has {X.shape[1]} features and {what} for {args.loss}")
        print(f"resumed from {args.resume} at epoch {trainer.epoch}")
    else:
        model = fb.MLP([X.shape[1], *args.hidden, n_out], activation=args.activation, dtype=args.dtype,
                       seed=args.seed, compute_dtype=args.compute_dtype)
        kwargs: dict[str, Any] = {"lr": args.lr}
        if args.optimizer in ("sgd", "rmsprop"):
            kwargs["momentum"] = args.momentum
        trainer = fb.Trainer(model, loss=args.loss, optimizer=OPTIMIZERS[args.optimizer](**kwargs),
                             batch_size=args.batch_size, seed=args.seed, comm=comm, cuda_graphs=args.cuda_graphs)
    model.preprocess_ = spec
    warmup = getattr(backend, "warmup", None)
    if warmup is not None:
        seconds = warmup(dtypes=[model.dtype.name], activations=sorted(set(model.activations[:-1])) or ["identity"])
        print(f"compile: {seconds:.2f} s (JIT kernels, cached on disk for the next run; not in training time)")
    mixed = f" computing in {model.compute_dtype.name}" if model.mixed else ""
    print(f"model: {model.sizes} {model.activations[0]}, {model.n_params} parameters, {model.dtype.name}{mixed}; "
          f"{type(trainer.optimizer).__name__} lr {trainer.optimizer.lr:g}, batch {trainer.batch_size}, "
          f"{args.epochs} epochs, loss {args.loss}")
    verbose = 0 if args.quiet else ("auto" if sys.stderr.isatty() else 2)  # a line per epoch into logs
    start = time.perf_counter()
    periodic = [fb.PeriodicCheckpoint(args.checkpoint, args.checkpoint_every)] if args.checkpoint_every else []
    history = trainer.fit(X_train, y_train, epochs=args.epochs, validation_data=validation,
                          verbose=verbose, interrupt_checkpoint=args.checkpoint, callbacks=periodic,
                          class_weight=None if args.class_weight == "none" else args.class_weight)
    train_time = time.perf_counter() - start
    if fused_route is not None:
        why = fused_route(model) or (None if args.loss == "cross_entropy" else f"the loss is {args.loss}")
        print(f"fused mlp: {'on' if why is None else 'not used: ' + why}")
    if args.cuda_graphs:
        print(f"cuda graphs: {trainer.graph_status}")
    if history.interrupted:
        saved = f"; checkpoint in {args.checkpoint}" if args.checkpoint else ""
        print(f"interrupted: {len(history)} epochs completed{saved}", file=sys.stderr)
    elif args.checkpoint:
        print(f"saved checkpoint to {trainer.save_checkpoint(args.checkpoint)}")
    result = trainer.evaluate(X_test, y_test)
    print(f"test loss: {result['loss']:.4f}")
    if "accuracy" in result:
        print(f"test accuracy: {result['accuracy']:.3f}")
    if args.save and trainer.is_writer:  # data parallel: rank 0 writes (every rank holds the same model)
        print(f"saved model to {model.save(args.save)}")
    if args.plot and trainer.is_writer:
        _plot(history, args.plot)
        print(f"saved plot to {args.plot}")
    epoch_time = sum(history["time"])
    print(f"training time: {epoch_time:.2f} s in {len(history)} epochs (fit {train_time:.2f} s, "
          f"wall {time.perf_counter() - wall:.2f} s)")
    return 130 if history.interrupted else 0


#: The communicator of a ``train --distributed`` job, for the error handling of ``main``.
_JOB: dict[str, Any] = {"comm": None}


def _communicator() -> Any:
    """The MPI communicator of ``train --distributed``; the ranks other than 0 print nothing (one report)."""
    from . import distributed

    try:
        comm = _JOB["comm"] = distributed.MPICommunicator()
    except distributed.DistributedUnavailable as exc:
        raise UsageError(str(exc)) from exc
    if comm.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    if comm.local_size > 1:  # the ranks of this machine share its cores
        from .threads import set_num_threads

        set_num_threads(max(1, (os.cpu_count() or 1) // comm.local_size))
    return comm


def _rank_device(asked: str, backend: Any, comm: Any) -> Any:
    """The backend of this rank in a data-parallel job: on a GPU backend whose device was not named
    ('cupy', 'auto'), the rank's own GPU (``distributed.local_device``); otherwise the one asked for."""
    from . import distributed

    if ":" in asked or not hasattr(backend, "device_id"):
        return backend
    count = backend.xp.cuda.runtime.getDeviceCount()
    device = distributed.local_device(comm, count)
    return backend if device == backend.device_id else f"{backend.name.partition(':')[0]}:{device}"


def _load_model(args: argparse.Namespace) -> Any:
    import fastbp as fb

    _check_file(args.model, "--model")
    model = fb.load(args.model, backend=fb.set_backend(args.backend))
    if model.loss_ is None:
        raise UsageError(f"--model {args.model!r} records no training loss: save it after training with fastbp "
                         f"train --save or a Trainer")
    return model


def cmd_predict(args: argparse.Namespace) -> int:
    model = _load_model(args)
    _check_file(args.data, "--data")
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise UsageError(f"--out {args.out!r}: folder {folder!r} does not exist")
    try:
        X = datasets.load_features(args.data, label_column=_label_column(args.label_column))
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"--data {args.data!r}: {exc}") from exc
    X = apply_preprocess(getattr(model, "preprocess_", None), X)
    values = model.predict_proba(X) if args.proba else model.predict(X)
    rows = values.reshape(len(values), -1)
    lines = [",".join(str(v) for v in row) for row in rows]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} predictions to {args.out}")
    else:
        print("\n".join(lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import importlib.util

    from .io import check_writable

    if importlib.util.find_spec("onnx") is None:
        raise UsageError("export needs the onnx package: pip install 'fastbp[onnx]'")
    check_writable(args.onnx, "--onnx", ".onnx")
    args.backend = "numpy"  # the weights are only read
    model = _load_model(args)
    model.to_onnx(args.onnx, opset=args.opset, probabilities=False if args.no_probabilities else None)
    outputs = "logits" + ("" if args.no_probabilities or model.loss_ not in ("cross_entropy", "binary_cross_entropy")
                          else " and probabilities")
    target = args.onnx if args.onnx.endswith(".onnx") else args.onnx + ".onnx"
    print(f"wrote {target}: {model.sizes} {model.dtype.name}, outputs {outputs}, opset {args.opset}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import fastbp as fb

    model = _load_model(args)
    X, y, source, _ = _load_data(args)
    X = apply_preprocess(getattr(model, "preprocess_", None), X)
    result = fb.Trainer(model, loss=model.loss_).evaluate(X, y)
    print(f"{source}: {X.shape[0]} samples")
    for key, value in result.items():
        print(f"{key}: {value:.4f}")
    return 0


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
    commands = {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "export": cmd_export,
                "info": cmd_info, "bench": _cmd_bench}
    try:
        # a diverging run is reported by the Trainer's check (one line, below), not by NumPy's warnings
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return commands[args.command](args)
    except (UsageError, ValueError, TypeError, OSError, FloatingPointError, MemoryError, RuntimeError) as exc:
        # FloatingPointError: a DivergenceError; RuntimeError: a backend that cannot run here
        message = " ".join(str(exc).split())  # one line
        job = _JOB["comm"]
        if job is None or job.rank == 0 or not getattr(exc, "collective", False):
            print(f"fastbp {args.command}: error: {message}", file=sys.stderr)
        if job is not None and job.size > 1 and not getattr(exc, "collective", False):
            job.abort(2)  # this rank alone failed: the others would wait for it forever
        return 2
    except KeyboardInterrupt:
        print(f"fastbp {args.command}: interrupted", file=sys.stderr)
        return 130


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import cmd_bench

    return cmd_bench(args)
