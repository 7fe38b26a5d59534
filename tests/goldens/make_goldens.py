"""Writes the golden checkpoints. Run once per format version; the files are committed and must keep
loading in every later version of lamina (tests/test_goldens.py). Never regenerate an existing file.

Every value is a formula of its index (see ``expected_*`` in test_goldens.py), so the tests check the
files against the formulas, not against what the code wrote.

    python tests/goldens/make_goldens.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lamina as lm  # noqa: E402
from test_goldens import expected_arrays, expected_model_values, golden_model  # noqa: E402


def main():
    lm.set_backend("numpy")
    for name, obj in (("v1_arrays.safetensors", expected_arrays()),
                      ("v1_list.safetensors", list(expected_arrays().values())[:3])):
        if not (HERE / name).exists():
            lm.save(obj, HERE / name)
    if not (HERE / "v1_model.safetensors").exists():
        model = golden_model()
        model.build((None, 3))
        model.load_state_dict(expected_model_values())
        lm.save(model, HERE / "v1_model.safetensors")


if __name__ == "__main__":
    main()
