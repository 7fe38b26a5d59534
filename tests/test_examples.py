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
