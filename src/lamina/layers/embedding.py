"""Embedding: a lookup table of vectors indexed by integers."""

from __future__ import annotations

from .. import init as _init
from .. import ops
from ..module import Module
from ..parameter import Parameter


class Embedding(Module):
    """Rows of a (num_embeddings, dim) table for integer indices: (...) -> (..., dim).

    Default initializer N(0, 1), as torch. Indices must be integers (a ``TypeError`` otherwise) in
    [0, num_embeddings): an index outside is a ``ValueError`` on every backend wherever its value is known;
    jax cannot raise inside compiled code, so there it gives a NaN row rather than a silently clamped one.

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); lm.Embedding(10, 4)(np.array([[1, 2, 3]])).shape
    <lamina backend 'numpy'>
    (1, 3, 4)
    """

    def __init__(self, num_embeddings: int, dim: int | None = None, *, embedding_dim: int | None = None, init=None):
        super().__init__()
        if (dim is None) == (embedding_dim is None):  # torch's keyword embedding_dim means dim
            raise TypeError(f"Embedding takes the vector size once, as dim or embedding_dim (torch's name): "
                            f"Embedding(num_embeddings, dim); got dim={dim!r}, embedding_dim={embedding_dim!r}")
        dim = embedding_dim if dim is None else dim
        for name, v in (("num_embeddings", num_embeddings), ("dim", dim)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"Embedding: {name} must be a positive int, got {v!r}")
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = Parameter((num_embeddings, dim), init=init or _init.normal())

    def forward(self, indices):
        return ops.embedding(self.weight, indices)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.dim}"
