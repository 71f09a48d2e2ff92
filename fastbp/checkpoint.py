"""Training checkpoints: the model, the optimizer (type, hyperparameters, schedule, state), the epoch and
step counts and the shuffling generator's state, in one .npz file with JSON metadata.

Written atomically (``io.write_npz_atomic``) and read without pickle; everything is validated (format
version, keys, shapes, dtypes, the generator state) before a Trainer is built, so a truncated, corrupt,
foreign or pickle-carrying file gives ValueError and changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import optim
from .io import VERSION, read_npz, write_npz_atomic
from .layers import MLP

FORMAT = "fastbp-checkpoint"


def save_checkpoint(trainer: Any, path: Any) -> Path:
    """Write ``trainer``'s whole training state to ``path``; returns the path written."""
    arrays, model_meta = trainer.model.to_arrays()
    opt = trainer.optimizer
    state = opt.state_dict()
    for key, value in state.items():
        if key != "step":
            arrays[f"opt.{key}"] = value
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": {k: model_meta[k] for k in ("dtype", "activations", "sizes", "compute_dtype") if k in model_meta},
        "trainer": {"loss": trainer.loss, "batch_size": trainer.batch_size, "clip_norm": trainer.clip_norm,
                    "on_nonfinite": trainer.on_nonfinite, "epoch": trainer.epoch, "steps": trainer.steps,
                    "skipped_steps": trainer.skipped_steps, "loss_scaling": trainer._loss_scaling_state()},
        "optimizer": {"type": type(opt).__name__, "hyperparameters": opt.hyperparameters(),
                      "schedule": opt.schedule.config(), "step": state["step"]},
        "rng": trainer.rng.bit_generator.state,
    }
    return write_npz_atomic(path, arrays, meta)


def load_checkpoint(path: Any, backend: Any, trainer_cls: Any) -> Any:
    """A ``trainer_cls`` (``fastbp.Trainer``) restored from ``save_checkpoint``; ValueError for any file
    that is not a valid one."""
    where = repr(str(path))
    arrays, meta = read_npz(path, FORMAT)
    try:
        model_meta, tmeta, ometa = meta["model"], meta["trainer"], meta["optimizer"]
        model_arrays_ = {k: v for k, v in arrays.items() if not k.startswith("opt.")}
        model = MLP.from_arrays(model_arrays_, dict(model_meta, format="fastbp-model"), backend, where)
        cls = {c.__name__: c for c in optim.OPTIMIZERS.values()}.get(ometa["type"])  # the one registry
        if cls is None:
            raise ValueError(f"unknown optimizer {ometa['type']!r}")
        opt = cls.from_hyperparameters(optim.schedule_from_config(ometa["schedule"]), ometa["hyperparameters"])
        state = {k[len("opt."):]: v for k, v in arrays.items() if k.startswith("opt.")}
        state["step"] = ometa["step"]
        for key, value in state.items():
            if key != "step" and (value.dtype != model.dtype or value.shape != (model.n_params,)):
                raise ValueError(f"optimizer state {key!r} has shape {value.shape} and dtype {value.dtype}; "
                                 f"expected ({model.n_params},) {model.dtype}")
        opt.load_state_dict(state, [model.flat_parameters()], model.backend)
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng"]
        trainer = trainer_cls(model, loss=tmeta["loss"], optimizer=opt, batch_size=tmeta["batch_size"],
                          clip_norm=tmeta["clip_norm"], on_nonfinite=tmeta["on_nonfinite"])
        counts = [tmeta[k] for k in ("epoch", "steps", "skipped_steps")]
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"invalid epoch/step counts {counts}")
        trainer.epoch, trainer.steps, trainer.skipped_steps = counts
        trainer.rng = rng
        trainer._set_loss_scaling_state(tmeta.get("loss_scaling"))
    except ValueError as exc:
        raise ValueError(f"{where} is not a valid fastbp checkpoint: {exc}") from exc
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{where} is not a valid fastbp checkpoint: bad or missing entry {exc}") from exc
    return trainer
