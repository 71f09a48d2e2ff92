"""fastbp.sklearn: scikit-learn's own estimator checks, its meta-estimators, pandas, and its MLP's behaviour."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install 'fastbp[sklearn]')")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits, load_iris  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from fastbp.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

# max_iter on small data ends fits before they converge, as it does scikit-learn's: that warning is expected
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


# Every check scikit-learn has for these estimators, with their default parameters; none is skipped by
# us (scikit-learn itself skips the array-API checks unless SCIPY_ARRAY_API=1 is set).
@parametrize_with_checks([MLPClassifier(), MLPRegressor()])
def test_scikit_learn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter on tiny data, as scikit-learn's MLP
        check(estimator)


@pytest.fixture
def iris():
    X, y = load_iris(return_X_y=True)
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


def test_fitted_attributes_are_scikit_learns(iris):
    X_train, X_test, y_train, y_test = iris
    clf = MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=300, random_state=0).fit(X_train, y_train)
    assert list(clf.classes_) == [0, 1, 2] and clf.n_features_in_ == 4
    assert [c.shape for c in clf.coefs_] == [(4, 16), (16, 8), (8, 3)]
    assert [b.shape for b in clf.intercepts_] == [(16,), (8,), (3,)]
    assert clf.n_layers_ == 4 and clf.n_outputs_ == 3 and clf.out_activation_ == "softmax"
    assert len(clf.loss_curve_) == clf.n_iter_ and clf.loss_ == clf.loss_curve_[-1]
    assert clf.best_loss_ == min(clf.loss_curve_) and clf.t_ == clf.n_iter_ * len(X_train)
    assert clf.validation_scores_ is None and clf.best_validation_score_ is None
    assert clf.score(X_test, y_test) > 0.9
    # the stopping rule: stopped once the loss had not improved by tol for n_iter_no_change + 1 epochs
    if clf.n_iter_ < 300:
        best_before = min(clf.loss_curve_[:-clf.n_iter_no_change - 1])
        assert all(v > best_before - clf.tol for v in clf.loss_curve_[-clf.n_iter_no_change - 1:])
    np.testing.assert_allclose(clf.predict_proba(X_test).sum(axis=1), 1.0)
    # the weights are the network's: a plain NumPy forward pass gives the same probabilities
    a = X_test
    for W, b in zip(clf.coefs_[:-1], clf.intercepts_[:-1]):
        a = np.maximum(a @ W + b, 0)
    z = a @ clf.coefs_[-1] + clf.intercepts_[-1]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(clf.predict_proba(X_test), p / p.sum(axis=1, keepdims=True), rtol=1e-10)


def test_early_stopping_keeps_the_best_validation_weights(iris):
    X_train, _, y_train, _ = iris
    clf = MLPClassifier(early_stopping=True, validation_fraction=0.2, max_iter=500, random_state=1,
                        n_iter_no_change=5).fit(X_train, y_train)
    assert len(clf.validation_scores_) == clf.n_iter_ < 500
    assert clf.best_validation_score_ == max(clf.validation_scores_)


def test_string_labels_multilabel_and_multioutput(rng):
    X = rng.standard_normal((120, 4))
    words = np.where(X[:, 0] > 0, "dog", "cat")
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=300, random_state=0, learning_rate_init=0.01).fit(X, words)
    assert list(clf.classes_) == ["cat", "dog"] and clf.score(X, words) > 0.9
    Y = np.column_stack([X[:, 0] > 0, X[:, 1] > 0, X[:, 0] + X[:, 1] > 0]).astype(int)
    multi = MLPClassifier(hidden_layer_sizes=(16,), max_iter=500, random_state=0, learning_rate_init=0.01).fit(X, Y)
    assert multi.out_activation_ == "logistic" and multi.predict(X).shape == (120, 3)
    assert multi.score(X, Y) > 0.8  # subset accuracy, as scikit-learn scores multi-label
    targets = np.column_stack([X[:, 0] - X[:, 1], 2 * X[:, 2]])
    reg = MLPRegressor(hidden_layer_sizes=(16,), max_iter=500, random_state=0, learning_rate_init=0.01)
    reg.fit(X, targets)
    assert reg.predict(X).shape == (120, 2) and reg.score(X, targets) > 0.9


def test_pipeline_grid_search_cross_validation_and_pickle(iris):
    X_train, X_test, y_train, y_test = iris
    pipe = make_pipeline(StandardScaler(), MLPClassifier(max_iter=200, random_state=0, learning_rate_init=0.01))
    grid = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(8,), (16,)],
                               "mlpclassifier__alpha": [1e-4, 1e-2]}, cv=3, n_jobs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        grid.fit(X_train, y_train)
        scores = cross_val_score(clone(pipe), X_train, y_train, cv=3)
    assert grid.best_score_ > 0.85 and scores.mean() > 0.85
    restored = pickle.loads(pickle.dumps(grid.best_estimator_))
    np.testing.assert_array_equal(restored.predict_proba(X_test), grid.best_estimator_.predict_proba(X_test))


def test_pandas_input_keeps_feature_names(iris):
    pd = pytest.importorskip("pandas", reason="pandas is not installed")
    X_train, X_test, y_train, _ = iris
    columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    clf = MLPClassifier(max_iter=300, random_state=0).fit(pd.DataFrame(X_train, columns=columns),
                                                           pd.Series(y_train))
    assert list(clf.feature_names_in_) == columns
    with pytest.warns(UserWarning, match="fitted with feature names"):
        clf.predict(X_test)
    with pytest.raises(ValueError, match="feature names"):
        clf.predict(pd.DataFrame(X_test, columns=columns[::-1]))


def test_warm_start_continues(iris):
    X_train, _, y_train, _ = iris
    clf = MLPClassifier(max_iter=5, warm_start=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train, y_train)
        first = clf.loss_curve_[-1]
        clf.fit(X_train, y_train)
    assert clf.n_iter_ == 10 and len(clf.loss_curve_) == 10 and clf.loss_curve_[-1] < first


def test_same_settings_match_scikit_learns_accuracy():
    """On the digits, mean test accuracy over seeds within 0.01 of scikit-learn's MLPClassifier with the same
    settings (benchmarks/compare_sklearn_estimators.py times them and adds more data sets)."""
    from sklearn.neural_network import MLPClassifier as SkMLP

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16, y, test_size=0.25, random_state=0, stratify=y)
    ours, theirs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for seed in range(3):
            kwargs = {"hidden_layer_sizes": (64,), "max_iter": 60, "random_state": seed}
            ours.append(MLPClassifier(**kwargs).fit(X_train, y_train).score(X_test, y_test))
            theirs.append(SkMLP(**kwargs).fit(X_train, y_train).score(X_test, y_test))
    assert abs(np.mean(ours) - np.mean(theirs)) < 0.01, (ours, theirs)


@pytest.mark.parametrize("params, match", [
    ({"solver": "lbfgs"}, "fastbp has no 'lbfgs'"), ({"activation": "softmax"}, "activation must be one of"),
    ({"hidden_layer_sizes": (0,)}, "hidden_layer_sizes"), ({"batch_size": 0}, "batch_size"),
])
def test_bad_parameters_say_what(params, match, iris):
    with pytest.raises(ValueError, match=match):
        MLPClassifier(**params).fit(iris[0], iris[2])


@pytest.fixture
def rng():
    return np.random.default_rng(0)
