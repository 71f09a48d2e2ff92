"""fastbp vs scikit-learn's MLPClassifier on the bundled digits, same architecture and settings.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/compare_sklearn.py [--reps 5] [--json F]

Both train a 64-128-64-10 ReLU MLP with Adam (lr 1e-3), batch 64, for 30 epochs on the same stratified
75/25 split of pixels/16 (seed 0). scikit-learn keeps its defaults otherwise (L2 alpha 1e-4, float64);
its early stopping is switched off (tol=0, n_iter_no_change=30) so it runs all 30 epochs. fastbp's JIT
compile time is measured apart (warmup) and excluded from its training time. Repetitions are
interleaved; the figures are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import fastbp as fb
from fastbp import datasets
from fastbp.envinfo import environment, format_environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    X, y = datasets.load_digits()
    X_tr, X_te, y_tr, y_te = datasets.train_test_split(X / 16, y, test_size=0.25, seed=0)
    env = environment()
    print(format_environment(env))
    compile_s = {}
    for name in fb.available_backends():
        bk = fb.backends.resolve_backend(name)
        if hasattr(bk, "warmup"):
            compile_s[name] = bk.warmup(dtypes=["float32"], activations=["relu"])

    def run_fastbp(name: str) -> tuple[float, float]:
        model = fb.MLP([64, 128, 64, 10], dtype="float32", seed=0, backend=name)
        trainer = fb.Trainer(model, optimizer=fb.optim.Adam(lr=1e-3), batch_size=64, seed=0)
        start = time.perf_counter()
        trainer.fit(X_tr, y_tr, epochs=30, verbose=0)
        return time.perf_counter() - start, trainer.evaluate(X_te, y_te)["accuracy"]

    def run_sklearn() -> tuple[float, float]:
        clf = MLPClassifier(hidden_layer_sizes=(128, 64), solver="adam", learning_rate_init=1e-3, batch_size=64,
                            max_iter=30, tol=0.0, n_iter_no_change=30, random_state=0)
        start = time.perf_counter()
        clf.fit(X_tr, y_tr)
        return time.perf_counter() - start, clf.score(X_te, y_te)

    runners = {f"fastbp-{name}": (lambda n=name: run_fastbp(n)) for name in fb.available_backends()}
    runners["scikit-learn"] = run_sklearn
    times: dict[str, list[float]] = {k: [] for k in runners}
    accuracy: dict[str, float] = {}
    for _ in range(args.reps):
        for key, run in runners.items():
            seconds, acc = run()
            times[key].append(seconds)
            accuracy[key] = acc
            time.sleep(0.25)  # let the last library's idle threads stop spinning
    print(f"\n{'trainer':16s} {'median s':>9s} {'min-max s':>15s} {'accuracy':>9s} {'speedup vs sklearn':>19s}")
    rows = []
    for key in runners:
        med = statistics.median(times[key])
        # the median of the per-round ratios: each round ran every trainer once, back to back
        speedup = statistics.median(s / t for s, t in zip(times["scikit-learn"], times[key]))
        print(f"{key:16s} {med:9.3f} {min(times[key]):7.3f}-{max(times[key]):<7.3f} {accuracy[key]:9.3f} "
              f"{speedup:19.2f}")
        rows.append({"trainer": key, "median_s": med, "min_s": min(times[key]), "max_s": max(times[key]),
                     "samples_s": times[key], "accuracy": accuracy[key], "speedup_vs_sklearn": speedup})
    for name, seconds in compile_s.items():
        print(f"compile (warmup) of {name}: {seconds:.2f} s, excluded above")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": rows, "compile_s": compile_s}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
