"""The command line, run in-process through fastbp.cli.main and once as `python -m fastbp`."""

import re
import subprocess
import sys

import numpy as np
import pytest

import fastbp as fb
from fastbp.cli import main


def test_default_train_on_digits_reaches_97_percent(capsys, tmp_path):
    code = main(["train", "--save", str(tmp_path / "digits.npz")])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^backend: \w+", out, re.M)
    assert out.count("epoch ") == 30
    accuracy = float(re.search(r"^test accuracy: (0\.\d{3})$", out, re.M).group(1))
    assert accuracy >= 0.97, out
    assert re.search(r"^training time: [\d.]+ s", out, re.M)
    model = fb.load(tmp_path / "digits.npz")
    assert model.sizes == [64, 128, 64, 10]


def test_train_options_and_csv_data(capsys, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 3))
    y = (X[:, 0] > 0).astype(int)
    np.savetxt(tmp_path / "d.csv", np.column_stack([X, y]), delimiter=",", header="a,b,c,label", comments="")
    code = main(["train", "--data", str(tmp_path / "d.csv"), "--label-column", "label", "--hidden", "8",
                 "--activation", "tanh", "--optimizer", "sgd", "--lr", "0.1", "--epochs", "5",
                 "--batch-size", "16", "--backend", "numpy", "--dtype", "float64", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "backend: numpy" in out and "epoch " not in out
    assert "preprocessing: standardize" in out and "[3, 8, 2]" in out
    assert float(re.search(r"test accuracy: ([\d.]+)", out).group(1)) > 0.8


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    assert main(["train", "--epochs", "2", "--quiet", "--plot", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,match", [
    (["train", "--backend", "tpu"], "backend must be one of"),
    (["train", "--data", "/nonexistent/file.csv"], "does not exist"),
    (["train", "--lr", "1e8", "--optimizer", "sgd", "--epochs", "3", "--backend", "numpy"],
     "non-finite loss at epoch 1"),  # a diverging run: one line, no traceback, no NumPy warnings
    (["train", "--data", "x.npz"], "'x.npz' is not a .npz file: an .npz file is a zip archive"),
    (["train", "--loss", "mse", "--data", "words.csv"], "--loss mse needs numeric targets; words.csv"),
    (["predict", "--model", "x.npz", "--data", "x.npz"], "'x.npz' is not a fastbp file"),
])
def test_user_mistakes_exit_2_with_one_line(capsys, argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.npz").write_text("not an archive")
    (tmp_path / "words.csv").write_text("1,2,cat\n3,4,dog\n5,6,cat\n7,8,dog\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


@pytest.mark.parametrize("argv", [["train", "--epochs", "0"], ["train", "--hidden", "12,x"], ["fly"],
                                  ["train", "--test-size", "1.5"], ["train", "--val-split", "1"],
                                  ["train", "--seed", "-3"]])
def test_argument_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_info_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastbp", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backends:" in result.stdout and "numpy  available" in result.stdout
    assert re.search(r"^cpu: ", result.stdout, re.M)


def test_checkpoint_and_resume(capsys, tmp_path):
    ckpt = tmp_path / "run.npz"
    assert main(["train", "--epochs", "2", "--quiet", "--checkpoint", str(ckpt), "--backend", "numpy"]) == 0
    assert ckpt.exists()
    assert main(["train", "--epochs", "3", "--quiet", "--resume", str(ckpt), "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at epoch 2" in out
    resumed = fb.Trainer.load_checkpoint(ckpt)
    assert resumed.epoch == 2  # resuming without --checkpoint leaves the file alone


@pytest.mark.parametrize("argv,match", [
    (["train", "--save", "/nonexistent/dir/m.npz", "--epochs", "1", "--quiet"], "does not exist"),
    (["train", "--checkpoint", "/nonexistent/dir/c.npz", "--epochs", "1"], "--checkpoint"),
    (["train", "--resume", "/nonexistent/c.npz"], "does not exist"),
    (["train", "--optimizer", "sgd", "--momentum", "1.5"], "momentum"),
    (["train", "--loss", "mse", "--class-weight", "balanced"], "--class-weight needs classes"),
])
def test_more_user_mistakes(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_argparse_mistakes_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "zero"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--epochs" in err


def test_train_on_mnist_style_idx_files(capsys, tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3, dtype=np.uint8), 40)
    images = (rng.integers(0, 60, (120, 4, 4)) + labels[:, None, None] * 60).astype(np.uint8)

    def idx(arr):
        return bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape) + arr.tobytes()

    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx(labels))
    code = main(["train", "--data", str(tmp_path / "train-images-idx3-ubyte"),
                 "--labels", str(tmp_path / "train-labels-idx1-ubyte"), "--epochs", "150", "--quiet",
                 "--hidden", "16", "--lr", "0.03", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert code == 0 and "preprocessing: scale" in out and "16 features, 3 classes" in out
    assert float(re.search(r"test accuracy: ([\d.]+)", out).group(1)) > 0.9


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fastbp {fb.__version__}"


def test_every_option_is_checked_before_any_work(capsys, tmp_path, monkeypatch):
    """A path that cannot be written, a missing data file or a missing plotting library is reported before
    anything is compiled or trained: the model is never lost at the end of a run."""
    import fastbp.trainer as trainer_module

    fits = []
    monkeypatch.setattr(trainer_module.Trainer, "fit", lambda *a, **k: fits.append(1))
    monkeypatch.setattr(fb.backends.numba_backend.NumbaBackend, "warmup", lambda *a, **k: fits.append(1) or 0.0)
    for argv, match in [(["--save", "/nonexistent/dir/m.npz"], "does not exist"),
                        (["--save", str(tmp_path)], "is a folder"),
                        (["--checkpoint", "/nonexistent/c.npz"], "does not exist"),
                        (["--data", str(tmp_path / "missing.csv")], "does not exist"),
                        (["--resume", str(tmp_path / "missing.npz")], "does not exist")]:
        assert main(["train", *argv]) == 2
        assert match in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    assert main(["train", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not fits


def test_labels_are_encoded_and_predictions_come_back_in_them(capsys, tmp_path):
    """Labels 1..3, {0, 10, 20} or words make a 3-class model (as scikit-learn encodes them), kept in the
    saved model: predict and evaluate answer in the user's labels."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((150, 2)) + np.repeat([[0, 0], [4, 0], [0, 4]], 50, axis=0)
    for names in (["cat", "dog", "emu"], [1, 2, 3], [0, 10, 20]):
        y = np.repeat(names, 50)
        with open(tmp_path / "d.csv", "w") as f:
            f.writelines(f"{a},{b},{c}\n" for (a, b), c in zip(X, y))
        model_file = tmp_path / "m.npz"
        assert main(["train", "--data", str(tmp_path / "d.csv"), "--epochs", "40", "--quiet", "--hidden", "8",
                     "--lr", "0.02", "--val-split", "0.2", "--save", str(model_file), "--backend", "numpy",
                     "--class-weight", "balanced"]) == 0
        out = capsys.readouterr().out
        assert "3 classes" in out and "validation 23" in out
        assert float(re.search(r"test accuracy: ([\d.]+)", out)[1]) > 0.9
        model = fb.load(model_file)
        assert model.sizes[-1] == 3 and list(model.classes_) == sorted(names)
        np.savetxt(tmp_path / "x.csv", X[[0, 60, 120]], delimiter=",")
        assert main(["predict", "--model", str(model_file), "--data", str(tmp_path / "x.csv")]) == 0
        assert capsys.readouterr().out.split() == [str(v) for v in names]
        assert main(["evaluate", "--model", str(model_file), "--data", str(tmp_path / "d.csv")]) == 0
        assert float(re.search(r"accuracy: ([\d.]+)", capsys.readouterr().out)[1]) > 0.9


def test_regression_from_the_command_line(capsys, tmp_path):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 3))
    y = X @ [1.0, -2.0, 0.5]
    np.savez(tmp_path / "r.npz", X=X, y=y)
    assert main(["train", "--data", str(tmp_path / "r.npz"), "--loss", "mse", "--epochs", "60", "--quiet",
                 "--hidden", "16", "--lr", "0.01", "--save", str(tmp_path / "m.npz"), "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "1 targets" in out and "accuracy" not in out
    assert float(re.search(r"test loss: ([\d.]+)", out)[1]) < 0.1
    np.savez(tmp_path / "x.npz", X=X[:4])
    assert main(["predict", "--model", str(tmp_path / "m.npz"), "--data", str(tmp_path / "x.npz"),
                 "--out", str(tmp_path / "p.csv")]) == 0
    predicted = np.loadtxt(tmp_path / "p.csv", delimiter=",")
    np.testing.assert_allclose(predicted, y[:4], atol=0.5)



@pytest.mark.emulator
def test_train_in_bfloat16_on_the_emulated_gpu(capsys, tmp_path):
    from conftest import EMULATED, EMULATOR_MISSING

    if EMULATOR_MISSING:
        pytest.skip(f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")
    code = main(["train", "--backend", EMULATED, "--compute-dtype", "bfloat16", "--hidden", "32", "--epochs", "10",
                 "--quiet", "--save", str(tmp_path / "m.npz")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "float32 computing in bfloat16" in out
    assert float(re.search(r"test accuracy: ([\d.]+)", out).group(1)) > 0.85
    assert fb.load(tmp_path / "m.npz", backend=EMULATED).compute_dtype.name == "bfloat16"


def test_train_refuses_mixed_precision_off_the_gpu(capsys):
    code = main(["train", "--backend", "numpy", "--compute-dtype", "float16", "--epochs", "1", "--quiet"])
    assert code != 0
    assert "runs on the cupy backend" in capsys.readouterr().err


def test_info_lists_each_backends_mixed_precision_dtypes(monkeypatch):
    from fastbp import envinfo
    from fastbp.backends.cupy_backend import CupyBackend

    mixed = envinfo.mixed_precision()
    assert "numpy" not in mixed and "numba" not in mixed  # they compute in their model dtype alone
    env = envinfo.environment()
    env["backends"] = {"cupy": "available", "numpy": "available"}
    env["mixed_precision"] = {"cupy": [d for d in CupyBackend.compute_dtypes if d in ("float16", "bfloat16")]}
    text = envinfo.format_environment(env)
    assert "  cupy   available (mixed precision: float16, bfloat16)" in text
    assert "  numpy  available\n" in text
