"""The examples run and print what they claim, on every backend."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BACKENDS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_layers_walkthrough(backend):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_layers.py"), "--backend", backend],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"on the {backend} backend" in text
    assert "matches the explicit loop: True" in text
    assert "matches numpy.fft.fft(x)[..., :4]: True" in text
    if backend == "numpy":
        assert "has no autodiff" in text
    else:
        assert "d loss / d 0.weight" in text


def run_training_example(script, backend, out_dir):
    """Run an example; return its output lines keyed by their text before the first colon, and the test
    accuracy it reports for ``backend``."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--backend", backend, "--out",
                          str(out_dir)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = {line.split(":")[0]: line for line in out.stdout.splitlines()}
    return lines, float(lines[f"test accuracy on {backend}"].split()[4])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_train_digits_reaches_95_percent_and_serves_on_numpy(backend, tmp_path):
    lines, accuracy = run_training_example("train_digits.py", backend, tmp_path)
    assert accuracy >= 0.95
    served = lines["reloaded on numpy"]
    assert f"test accuracy {accuracy:.4f}" in served and f"identical to {backend}'s: True" in served
    assert (tmp_path / "digits.safetensors").stat().st_size > 0
    assert (tmp_path / "digits_loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_cnn_digits_reaches_97_percent(backend, tmp_path):
    lines, accuracy = run_training_example("cnn_digits.py", backend, tmp_path)
    assert accuracy >= 0.97
    assert f"test accuracy {accuracy:.4f}" in lines["reloaded on numpy"]
    assert (tmp_path / "cnn_digits_loss.png").read_bytes()[:4] == b"\x89PNG"
