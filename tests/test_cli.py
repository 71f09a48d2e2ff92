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
    (["train", "--test-size", "1.5"], "test-size"),
])
def test_user_mistakes_exit_2_with_one_line(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


@pytest.mark.parametrize("argv", [["train", "--epochs", "0"], ["train", "--hidden", "12,x"], ["fly"],
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
