"""Built-in layers, one concept per file."""

from .activation import GELU, LeakyReLU, LogSoftmax, ReLU, Sigmoid, Softmax, Tanh
from .containers import ModuleDict, ModuleList, Sequential
from .fourier import LeadingFourier
from .linear import Linear
from .reshape import Flatten, Identity
from .tensor_reduction import TensorReduction

__all__ = ["GELU", "LeakyReLU", "LogSoftmax", "ReLU", "Sigmoid", "Softmax", "Tanh", "ModuleDict", "ModuleList",
           "Sequential", "LeadingFourier", "Linear", "Flatten", "Identity", "TensorReduction"]
