"""fastbp.sklearn's estimators against scikit-learn's own, same settings, on data sets that ship with
scikit-learn: test accuracy (mean over seeds) and fit time end to end.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/compare_sklearn_estimators.py [--seeds 5]

Per data set (digits, wine, breast cancer; features standardized on the training split, 25% held out,
stratified), both ``MLPClassifier``s get scikit-learn's defaults (hidden (100,), relu, Adam lr 1e-3,
batch min(200, n), max_iter 200, tol 1e-4, n_iter_no_change 10) and the same random_state, and are fitted
in turn, seed after seed. fastbp uses its default backend ('auto': numba here), float64 like
scikit-learn on float64 input; its kernels are compiled (or loaded from the disk cache) before timing.
Reported: mean test accuracy of each, the difference, median fit times and the median of the per-seed
time ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as SkMLP
from sklearn.preprocessing import StandardScaler

from fastbp.sklearn import MLPClassifier as FbMLP

DATASETS = {"digits": load_digits, "wine": load_wine, "breast_cancer": load_breast_cancer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)
    FbMLP(max_iter=2).fit(*load_wine(return_X_y=True))  # compile (or load) the kernels first
    print(f"{'data':14s} {'n':>5s} {'acc fastbp':>10s} {'acc sklearn':>11s} {'diff':>7s} "
          f"{'fit s fastbp':>12s} {'fit s sklearn':>13s} {'speedup':>8s}")
    for name, load in DATASETS.items():
        X, y = load(return_X_y=True)
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
        scaler = StandardScaler().fit(X_train)
        X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
        acc: dict[str, list[float]] = {"fastbp": [], "sklearn": []}
        secs: dict[str, list[float]] = {"fastbp": [], "sklearn": []}
        for seed in range(args.seeds):
            for label, cls in (("fastbp", FbMLP), ("sklearn", SkMLP)):
                est = cls(random_state=seed)
                start = time.perf_counter()
                est.fit(X_train, y_train)
                secs[label].append(time.perf_counter() - start)
                acc[label].append(est.score(X_test, y_test))
        a_fb, a_sk = float(np.mean(acc["fastbp"])), float(np.mean(acc["sklearn"]))
        speedup = statistics.median(s / f for f, s in zip(secs["fastbp"], secs["sklearn"]))
        print(f"{name:14s} {len(X):5d} {a_fb:10.4f} {a_sk:11.4f} {a_fb - a_sk:+7.4f} "
              f"{statistics.median(secs['fastbp']):12.3f} {statistics.median(secs['sklearn']):13.3f} "
              f"{speedup:7.2f}x")


if __name__ == "__main__":
    main()
