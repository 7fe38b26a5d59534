"""Lamina: write a neural-network layer once, as plain array code; run, train and save it on PyTorch,
JAX and NumPy.

>>> import lamina as lm
>>> class CenteredLayer(lm.Module):
...     def forward(self, X):
...         return X - X.mean()

Importing lamina imports no backend; a backend's library is imported the first time it is used.
"""

from . import distributed, init, losses, ops, optim, random, testing
from .backends import available_backends, backend_of, devices, get_backend, set_backend
from .checkpoint import load, load_into, save
from .errors import (
                     BackendError,
                     CheckpointError,
                     DeviceError,
                     LaminaError,
                     LayerError,
                     ModuleError,
                     ParameterNotFoundError,
                     ShapeError,
                     UninitializedParameterError,
)
from .export import export
from .functional import functional_call, value_and_grad
from .init import manual_seed
from .layers import (
                     GELU,
                     GRU,
                     LSTM,
                     RNN,
                     AvgPool1d,
                     AvgPool2d,
                     BatchNorm1d,
                     BatchNorm2d,
                     Conv1d,
                     Conv2d,
                     Dropout,
                     Embedding,
                     Flatten,
                     GlobalAvgPool,
                     Identity,
                     LayerNorm,
                     LeadingFourier,
                     LeakyReLU,
                     Linear,
                     LogSoftmax,
                     MaxPool1d,
                     MaxPool2d,
                     ModuleDict,
                     ModuleList,
                     MultiHeadAttention,
                     ReLU,
                     RMSNorm,
                     Sequential,
                     Sigmoid,
                     Softmax,
                     Tanh,
                     TensorReduction,
)
from .module import Module
from .parameter import Buffer, Parameter
from .torch_weights import load_torch
from .train import Callback, Checkpoint, EarlyStopping, History, compile, evaluate, fit, predict
from .training.torch_module import as_torch_module
from .version import __version__ as __version__

__all__ = [
    # core
    "Module", "Parameter", "Buffer", "init", "ops", "losses", "optim", "random", "testing", "manual_seed",
    # backends
    "set_backend", "get_backend", "backend_of", "available_backends", "devices",
    # checkpoints
    "save", "load", "load_into", "load_torch",
    # serving
    "export",
    # training
    "fit", "evaluate", "predict", "compile", "History", "Callback", "EarlyStopping", "Checkpoint",
    # scaling out
    "distributed", "as_torch_module",
    # pure functions and gradients
    "functional_call", "value_and_grad",
    # layers
    "Linear", "Sequential", "ModuleList", "ModuleDict", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "GELU", "Softmax",
    "LogSoftmax", "Flatten", "Identity", "TensorReduction", "LeadingFourier",
    "Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "GlobalAvgPool", "LayerNorm", "RMSNorm",
    "Embedding", "BatchNorm1d", "BatchNorm2d", "Dropout", "RNN", "GRU", "LSTM", "MultiHeadAttention",
    # errors
    "LaminaError", "LayerError", "ShapeError", "BackendError", "DeviceError", "ModuleError",
    "UninitializedParameterError", "CheckpointError", "ParameterNotFoundError",
]
