"""``lm.ops``: the one public door for array code inside ``forward``, on every backend.

Each function finds the backend of its array arguments and runs that backend's implementation: a native
kernel where it is measurably faster (``torch.relu``, ``jax.nn.softmax``, ...), generic Array-API code
through ``array_api_compat`` otherwise. All of them work under ``torch.autograd``, ``jax.grad`` and
``jax.jit``.

- ``ops/core.py``: ``asarray(x, like=)``, ``namespace(x)``, ``int_tuple`` (as ``keras.ops.core``).
- ``ops/nn.py``: the neural-network ops (activations, linear, conv, pooling, normalization, attention,
  dropout, recurrent kernels, scan, stop_gradient).

>>> import lamina as lm, numpy as np
>>> lm.ops.relu(np.array([-1.0, 2.0]))
array([0., 2.])
"""

from .core import *  # noqa: F403
from .core import __all__ as _core_all
from .nn import *  # noqa: F403
from .nn import __all__ as _nn_all
from .numpy import *  # noqa: F403
from .numpy import __all__ as _numpy_all

__all__ = [*_core_all, *_nn_all, *_numpy_all]
