import subprocess
import sys

import lamina as lm


def test_import_lamina_imports_no_backend():
    code = ("import sys, lamina, lamina.ops, lamina.init; "
            "print(sorted(m for m in ('torch', 'jax', 'jaxlib', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_backend_is_imported_on_first_use_only():
    code = ("import sys, lamina as lm; import numpy as np; lm.set_backend('numpy'); "
            "lm.Linear(3, 2)(np.ones((1, 3), 'float32')); "
            "print('torch' in sys.modules, 'jax' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_public_api_is_pinned():
    assert sorted(lm.__all__) == sorted([
        "Module", "Parameter", "Buffer", "init", "ops", "manual_seed",
        "set_backend", "get_backend", "backend_of", "available_backends", "devices",
        "save", "load", "load_into", "load_torch", "export",
        "fit", "evaluate", "predict", "compile", "History", "Callback", "EarlyStopping", "Checkpoint",
        "distributed", "as_torch_module",
        "losses", "optim", "testing",
        "functional_call", "value_and_grad",
        "Linear", "Sequential", "ModuleList", "ModuleDict", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "GELU",
        "Softmax", "LogSoftmax", "Flatten", "Identity", "TensorReduction", "LeadingFourier",
        "Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "GlobalAvgPool", "LayerNorm",
        "RMSNorm", "Embedding", "BatchNorm1d", "BatchNorm2d", "Dropout", "random",
        "RNN", "GRU", "LSTM", "MultiHeadAttention",
        "LaminaError", "LayerError", "ShapeError", "BackendError", "DeviceError", "ModuleError",
        "UninitializedParameterError", "CheckpointError", "ParameterNotFoundError",
    ])
    for name in lm.__all__:
        assert hasattr(lm, name), name
