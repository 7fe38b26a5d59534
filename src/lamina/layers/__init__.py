"""Built-in layers, one concept per file."""

from .activation import GELU, LeakyReLU, LogSoftmax, ReLU, Sigmoid, Softmax, Tanh
from .attention import MultiHeadAttention
from .batchnorm import BatchNorm1d, BatchNorm2d
from .containers import ModuleDict, ModuleList, Sequential
from .conv import Conv1d, Conv2d
from .dropout import Dropout
from .embedding import Embedding
from .fourier import LeadingFourier
from .linear import Linear
from .normalization import LayerNorm, RMSNorm
from .pooling import AvgPool1d, AvgPool2d, GlobalAvgPool, MaxPool1d, MaxPool2d
from .recurrent import GRU, LSTM, RNN
from .reshape import Flatten, Identity
from .tensor_reduction import TensorReduction

__all__ = ["GELU", "LeakyReLU", "LogSoftmax", "ReLU", "Sigmoid", "Softmax", "Tanh", "ModuleDict", "ModuleList",
           "Sequential", "LeadingFourier", "Linear", "Flatten", "Identity", "TensorReduction", "Conv1d", "Conv2d",
           "Embedding", "LayerNorm", "RMSNorm", "AvgPool1d", "AvgPool2d", "GlobalAvgPool", "MaxPool1d", "MaxPool2d",
           "BatchNorm1d", "BatchNorm2d", "Dropout", "RNN", "GRU", "LSTM",
           "MultiHeadAttention"]
