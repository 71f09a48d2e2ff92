"""scikit-learn estimators: ``MLPClassifier`` and ``MLPRegressor`` trained by fastbp.

They take scikit-learn's own parameters where the meaning is the same (``hidden_layer_sizes``,
``activation``, ``solver``, ``alpha``, ``batch_size``, ``learning_rate_init``, ``max_iter``, ``shuffle``,
``random_state``, ``tol``, ``verbose``, ``warm_start``, ``momentum``, ``nesterovs_momentum``,
``early_stopping``, ``validation_fraction``, ``n_iter_no_change``, ``beta_1``, ``beta_2``, ``epsilon``) plus
fastbp's ``backend`` and ``dtype``, stop as scikit-learn's ``sklearn.neural_network`` estimators stop, and
have their fitted attributes (``classes_``, ``n_features_in_``, ``feature_names_in_``, ``coefs_``,
``intercepts_``, ``loss_``, ``loss_curve_``, ``best_loss_``, ``validation_scores_``,
``best_validation_score_``, ``n_iter_``, ``t_``, ``n_layers_``, ``n_outputs_``, ``out_activation_``). So
they work in ``Pipeline``, ``GridSearchCV`` and ``cross_val_score``, with pandas input and feature names,
and they pickle and clone: their state is host NumPy arrays and the backend's name.

Differences, all documented on the parameters: ``alpha`` is applied as the optimizer's L2 weight decay
alpha / batch_size (scikit-learn's gradient term), to the biases too; ``loss_`` leaves out the L2 penalty;
``solver='lbfgs'`` and the ``learning_rate`` schedules other than 'constant' are not offered.

Needs scikit-learn (``pip install 'fastbp[sklearn]'``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data

from .callbacks import Callback

#: scikit-learn's activation names, and fastbp's own, to fastbp's.
_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu",
                "leaky_relu": "leaky_relu", "gelu": "gelu", "silu": "silu", "sigmoid": "sigmoid"}
_SOLVERS = ("adam", "sgd")


class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share: the network, the optimizer and the epoch loop."""

    def __init__(self, hidden_layer_sizes: Any = (100,), activation: str = "relu", *, solver: str = "adam",
                 alpha: float = 0.0001, batch_size: Any = "auto", learning_rate_init: float = 0.001,
                 max_iter: int = 200, shuffle: bool = True, random_state: Any = None, tol: float = 1e-4,
                 verbose: bool = False, warm_start: bool = False, momentum: float = 0.9,
                 nesterovs_momentum: bool = True, early_stopping: bool = False, validation_fraction: float = 0.1,
                 beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8, n_iter_no_change: int = 10,
                 backend: str = "auto", dtype: Any = None) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.backend = backend
        self.dtype = dtype

    # -------------------------------------------------------------- what subclasses say
    _loss: str  # fastbp's loss
    _loss_scale = 1.0  # fastbp's loss times this is the estimator's loss_ (scikit-learn's definition)

    def _targets(self, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _score_for_stopping(self, X: np.ndarray, y: np.ndarray) -> float:
        raise NotImplementedError

    # -------------------------------------------------------------- fitting
    def _check_params(self, n_samples: int) -> None:
        sizes = self.hidden_layer_sizes
        sizes = [sizes] if np.isscalar(sizes) else list(sizes)
        if not all(isinstance(s, (int, np.integer)) and s > 0 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got {self.hidden_layer_sizes!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS} (fastbp has no 'lbfgs'), got {self.solver!r}")
        if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter > 0):
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if self.batch_size != "auto" and not (isinstance(self.batch_size, (int, np.integer)) and self.batch_size > 0):
            raise ValueError(f"batch_size must be 'auto' or a positive integer, got {self.batch_size!r}")
        if self.alpha < 0 or self.learning_rate_init <= 0 or self.tol < 0:
            raise ValueError("alpha and tol must be >= 0 and learning_rate_init > 0")
        if self.early_stopping and not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        if not (isinstance(self.n_iter_no_change, (int, np.integer)) and self.n_iter_no_change > 0):
            raise ValueError(f"n_iter_no_change must be a positive integer, got {self.n_iter_no_change!r}")
        self._hidden = [int(s) for s in sizes]
        self._batch = min(200, n_samples) if self.batch_size == "auto" else int(min(self.batch_size, n_samples))

    def _optimizer(self) -> Any:
        from . import optim

        decay = self.alpha / self._batch  # scikit-learn adds alpha * W / batch_size to each gradient
        if self.solver == "sgd":
            return optim.SGD(self.learning_rate_init * self._loss_scale, momentum=self.momentum,
                             nesterov=bool(self.nesterovs_momentum and self.momentum > 0), weight_decay=decay)
        return optim.Adam(self.learning_rate_init, betas=(self.beta_1, self.beta_2), eps=self.epsilon,
                          weight_decay=decay)

    def _fit(self, X: Any, y: Any) -> Any:
        import fastbp as fb

        first = not (self.warm_start and hasattr(self, "coefs_"))
        X, y = validate_data(self, X, y, reset=first, dtype=[np.float64, np.float32], multi_output=True,
                             y_numeric=isinstance(self, RegressorMixin))
        targets = self._targets(y)
        self._check_params(X.shape[0])
        dtype = self.dtype if self.dtype is not None else X.dtype
        rng = check_random_state(self.random_state)
        if first:
            seed = int(rng.randint(np.iinfo(np.int32).max))
            sizes = [X.shape[1], *self._hidden, targets.shape[1] if targets.ndim == 2 else len(self.classes_)]
            model = fb.MLP(sizes, activation=_ACTIVATIONS[self.activation], dtype=dtype, seed=seed,
                           backend=self.backend)
            self._trainer = fb.Trainer(model, loss=self._loss, optimizer=self._optimizer(), batch_size=self._batch,
                                       seed=int(rng.randint(np.iinfo(np.int32).max)))
            self.loss_curve_: list[float] = []
            self.n_iter_ = 0
            self.t_ = 0
            self.best_loss_ = np.inf
            self.validation_scores_: list[float] | None = [] if self.early_stopping else None
            self.best_validation_score_: float | None = -np.inf if self.early_stopping else None
        else:
            self._trainer = self._trainer_for_warm_start()
        X_val = y_val = None
        X_fit, y_fit = X, targets
        if self.early_stopping:
            stratify = y if (isinstance(self, ClassifierMixin) and targets.ndim == 1) else None
            # the validation labels in the user's values: the score compares them with predictions
            X_fit, X_val, y_fit, _, _, y_val = train_test_split(
                X, targets, y, random_state=rng, test_size=self.validation_fraction, stratify=stratify)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size "
                                 "of your dataset.")
        stopper = _Stopping(self, X_fit.shape[0], X_val, y_val)
        self._trainer.fit(X_fit, y_fit, epochs=self.max_iter, shuffle=self.shuffle, verbose=0, callbacks=[stopper])
        if stopper.best is not None:  # early stopping: the best validation score's weights
            self._trainer.model.set_weights(stopper.best)
        self._export_weights()
        if not stopper.converged:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                          f"optimization hasn't converged yet.", ConvergenceWarning, stacklevel=3)
        return self

    def _trainer_for_warm_start(self) -> Any:
        """The trainer of the last fit (its optimizer state kept), or one rebuilt from coefs_ (unpickled)."""
        import fastbp as fb

        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            model = self._network()
            trainer = fb.Trainer(model, loss=self._loss, optimizer=self._optimizer(), batch_size=self._batch)
        trainer.batch_size = self._batch
        return trainer

    def _export_weights(self) -> None:
        model = self._trainer.model
        weights = model.get_weights()  # host copies in the model's dtype
        self.coefs_, self.intercepts_ = weights[::2], weights[1::2]
        self.n_layers_ = len(self.coefs_) + 1
        self.n_outputs_ = int(self.coefs_[-1].shape[1])
        self._model = model

    def _network(self) -> Any:
        """The fitted network (rebuilt from coefs_ and intercepts_ after unpickling)."""
        model = getattr(self, "_model", None)
        if model is None:
            import fastbp as fb

            layers = [(W, b, act) for W, b, act in zip(self.coefs_, self.intercepts_, self._layer_activations())]
            model = fb.MLP.from_weights(layers, backend=self.backend)
            model.loss_ = self._loss
            self._model = model
        return model

    def _layer_activations(self) -> list[str]:
        return [_ACTIVATIONS[self.activation]] * (len(self.coefs_) - 1) + ["identity"]

    def _outputs(self, X: Any) -> np.ndarray:
        """The network's outputs (float64) for X, checked as scikit-learn checks it."""
        check_is_fitted(self, "coefs_")
        return self._forward(validate_data(self, X, reset=False, dtype=[np.float64, np.float32]))

    def _forward(self, X: np.ndarray) -> np.ndarray:
        model = self._network()
        return np.asarray(model.backend.to_numpy(model.forward(X.astype(model.dtype, copy=False))), np.float64)

    # -------------------------------------------------------------- pickling: host arrays and names only
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_model", None)
        state.pop("_trainer", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if hasattr(super(), "__setstate__"):
            super().__setstate__(state)
        else:
            self.__dict__.update(state)
        if "coefs_" in state:
            self._network()


class _Stopping(Callback):
    """scikit-learn's stopping rule and bookkeeping, epoch by epoch (sklearn's _update_no_improvement_count):
    stop once the training loss (or, with early_stopping, the validation score) has not improved by tol for
    more than n_iter_no_change epochs."""

    def __init__(self, est: _BaseMLP, n_samples: int, X_val: Any, y_val: Any) -> None:
        self.est, self.n_samples, self.X_val, self.y_val = est, n_samples, X_val, y_val
        self.no_improvement = 0
        self.converged = False
        self.best: list[np.ndarray] | None = None

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, Any]) -> None:
        est = self.est
        loss = float(logs["loss"]) * est._loss_scale
        est.n_iter_ += 1
        est.t_ += self.n_samples
        est.loss_ = loss
        est.loss_curve_.append(loss)
        if est.verbose:
            print(f"Iteration {est.n_iter_}, loss = {loss:.8f}")
        if self.X_val is not None:
            est._model = trainer.model
            score = est._score_for_stopping(self.X_val, self.y_val)
            assert est.validation_scores_ is not None and est.best_validation_score_ is not None
            est.validation_scores_.append(score)
            if est.verbose:
                print(f"Validation score: {score:f}")
            self.no_improvement = self.no_improvement + 1 if score < est.best_validation_score_ + est.tol else 0
            if score > est.best_validation_score_:
                est.best_validation_score_ = score
                self.best = trainer.model.get_weights()
        else:
            self.no_improvement = self.no_improvement + 1 if loss > est.best_loss_ - est.tol else 0
            est.best_loss_ = min(est.best_loss_, loss)
        if self.no_improvement > est.n_iter_no_change:
            self.converged = True
            trainer.stop_training = True
            if est.verbose:
                what = "Validation score" if self.X_val is not None else "Training loss"
                print(f"{what} did not improve more than tol={est.tol:f} for {est.n_iter_no_change} "
                      f"consecutive epochs. Stopping.")


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multilayer perceptron classifier, scikit-learn's ``MLPClassifier`` trained by fastbp.

    Softmax cross-entropy over the classes (binary problems included); multi-label targets (an indicator
    matrix) train one sigmoid output per label with binary cross-entropy. Parameters as scikit-learn's,
    plus ``backend`` ('auto', 'numpy', 'numba', 'cupy', 'cupy:N') and ``dtype`` (None: float32 for
    float32 input, else float64).
    """

    def _targets(self, y: np.ndarray) -> np.ndarray:
        if type_of_target(y) == "multilabel-indicator":
            self._multilabel = True
            self._loss = "binary_cross_entropy"
            self.classes_ = np.arange(y.shape[1])
            self.out_activation_ = "logistic"
            return np.asarray(y, np.float64)
        check_classification_targets(y)
        if y.ndim == 2 and y.shape[1] == 1:
            from sklearn.utils.validation import column_or_1d

            y = column_or_1d(y, warn=True)
        classes = unique_labels(y)
        if self.warm_start and hasattr(self, "classes_") and not np.array_equal(classes, self.classes_) \
                and not set(classes) <= set(self.classes_):
            raise ValueError(f"warm_start can only be used where `y` has the same classes as in the previous "
                             f"call to fit. Previously got {self.classes_}, `y` has {classes}")
        if not (self.warm_start and hasattr(self, "classes_")):
            self.classes_ = classes
        self._multilabel = False
        self._loss = "cross_entropy"
        self.out_activation_ = "softmax"
        return np.searchsorted(self.classes_, y).astype(np.int64)

    def fit(self, X: Any, y: Any) -> MLPClassifier:
        """Fit the model to data matrix X and target(s) y (class labels, or a label indicator matrix)."""
        return self._fit(X, y)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probability of each class (softmax), or of each label (sigmoids, multi-label)."""
        z = self._outputs(X)
        if self._multilabel:
            return 1.0 / (1.0 + np.exp(-z))
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Log of ``predict_proba``."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """Class labels (or, multi-label, the indicator matrix)."""
        return self._labels(self._outputs(X))

    def _labels(self, z: np.ndarray) -> np.ndarray:
        if self._multilabel:
            return (z > 0).astype(int)
        return self.classes_[np.argmax(z, axis=1)]

    def _score_for_stopping(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(accuracy_score(y, self._labels(self._forward(X))))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        tags.input_tags.allow_nan = False
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """A multilayer perceptron regressor, scikit-learn's ``MLPRegressor`` trained by fastbp.

    Squared error, one output per target (multi-output targets included); ``loss_`` is scikit-learn's
    squared_error, half the mean squared error. Parameters as scikit-learn's, plus ``loss`` (only
    'squared_error'), ``backend`` and ``dtype``.
    """

    _loss = "mse"
    _loss_scale = 0.5  # scikit-learn's squared_error is half fastbp's mse: its gradients, and loss_, too

    def __init__(self, hidden_layer_sizes: Any = (100,), activation: str = "relu", *, loss: str = "squared_error",
                 solver: str = "adam", alpha: float = 0.0001, batch_size: Any = "auto",
                 learning_rate_init: float = 0.001, max_iter: int = 200, shuffle: bool = True,
                 random_state: Any = None, tol: float = 1e-4, verbose: bool = False, warm_start: bool = False,
                 momentum: float = 0.9, nesterovs_momentum: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, n_iter_no_change: int = 10, backend: str = "auto", dtype: Any = None) -> None:
        super().__init__(hidden_layer_sizes, activation, solver=solver, alpha=alpha, batch_size=batch_size,
                         learning_rate_init=learning_rate_init, max_iter=max_iter, shuffle=shuffle,
                         random_state=random_state, tol=tol, verbose=verbose, warm_start=warm_start,
                         momentum=momentum, nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
                         validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         n_iter_no_change=n_iter_no_change, backend=backend, dtype=dtype)
        self.loss = loss

    def _targets(self, y: np.ndarray) -> np.ndarray:
        if self.loss != "squared_error":
            raise ValueError(f"loss must be 'squared_error' (fastbp has no other regression loss), got {self.loss!r}")
        self.out_activation_ = "identity"
        y = np.asarray(y, np.float64)
        self._single = y.ndim == 1
        return y.reshape(len(y), -1)

    def fit(self, X: Any, y: Any) -> MLPRegressor:
        """Fit the model to data matrix X and target(s) y."""
        return self._fit(X, y)

    def predict(self, X: Any) -> np.ndarray:
        """The predicted values, (n_samples,) for one target, else (n_samples, n_outputs)."""
        z = self._outputs(X)
        return z[:, 0] if self._single else z

    def _score_for_stopping(self, X: np.ndarray, y: np.ndarray) -> float:
        z = self._forward(X)
        return float(r2_score(y, z[:, 0] if self._single else z))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.input_tags.allow_nan = False
        return tags


__all__ = ["MLPClassifier", "MLPRegressor"]
