"""Checkpoints in the safetensors format: arrays, collections of arrays and model parameters.

Files are written with the ``safetensors`` library, so ``safetensors.numpy.load_file`` and every other
safetensors reader opens them. Nothing is ever unpickled. A save writes a temporary file in the target's
folder, flushes it to disk and renames it over the target, so a crash or a full disk mid-save leaves the
previous file as it was.

Loading into a model is strict and all-or-nothing. Every key, shape and dtype in the file's header is
checked against the model before any value is written, and all problems are reported in one
``CheckpointError``. The values are then copied one tensor at a time, so a load needs little memory
beyond the model itself.

Metadata in each file (``__metadata__`` of the safetensors header, all strings): ``format`` ("lamina"),
``format_version``, ``lamina_version``, ``kind`` (array, list, tuple, dict or module), ``keys`` (the
original order), and for modules ``class`` and ``aliases`` (tied parameters: ``{alias path: stored path}``).

Dtype policy when loading into a model: a floating-point value loads into a floating-point parameter of
another precision by casting to the parameter's dtype (as ``torch.Tensor.copy_`` does); an integer loads
into an integer type that holds all its values (int32 into int64, as a jax checkpoint does into torch);
any other difference (int into float, float into int, int64 into int32, bool) is a mismatch and is
reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .backends import backend_of, get_backend
from .errors import CheckpointError
from .module import Module
from .statedict import apply_load, plan_load

__all__ = ["save", "load", "load_into", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
              "U8": "uint8", "BOOL": "bool", "C64": "complex64"}


# ----- writing ------------------------------------------------------------------------------------
_OPTIM = "@optimizer/"  # key prefix of optimizer state in a model checkpoint


def save(obj, path, *, metadata: dict | None = None, durable: bool = True, optimizer=None) -> None:
    """Save a model's parameters, one array, a list or tuple of arrays, or a dict of str -> array.

    Arrays may come from any backend; each keeps its dtype exactly (bfloat16 through ml_dtypes).
    A model is saved as its ``state_dict()`` (tied parameters once, with their aliases recorded).
    ``metadata``: extra ``{str: str}`` entries for the file's header.

    The file is written next to ``path`` under a temporary name and renamed over it, so an interrupted
    save never leaves a half-written ``path``. ``durable=True`` (the default) also flushes the data to
    the disk before the rename, so that even a power loss cannot leave an empty or partial file
    behind; that costs the disk's write time (for a few hundred MB, a few tenths of a second).
    ``durable=False`` skips the flush, as ``torch.save`` and ``safetensors`` do.

    ``optimizer``: with a model, also store that optimizer's state (moments, step counts) under keys
    ``@optimizer/<parameter>/<slot>``, so that ``load_into(model, path, optimizer=...)`` resumes training
    exactly where it stopped.

    >>> import lamina as lm, numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "arrays.safetensors")
    >>> lm.save({"steps": np.arange(3), "w": np.ones(2, "float16")}, path)
    >>> {k: v.dtype for k, v in lm.load(path, backend="numpy").items()}
    {'steps': dtype('int64'), 'w': dtype('float16')}
    """
    meta = {"format": "lamina", "format_version": str(FORMAT_VERSION), "lamina_version": _version()}
    if isinstance(obj, Module):
        tensors, aliases = _module_tensors(obj)
        meta.update(kind="module", aliases=json.dumps(aliases), **{"class": type(obj).__name__})
        if optimizer is not None:
            for k, v in optimizer.state_dict().items():
                tensors[_OPTIM + k] = _host(v, f"optimizer state {k!r}")
            meta.update(optimizer=type(optimizer).__name__, optimizer_steps=str(optimizer.steps))
    elif optimizer is not None:
        raise TypeError("lm.save: optimizer= goes with a model checkpoint")
    elif isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str) or not k]
        if bad:
            raise TypeError(f"lm.save: dict keys must be non-empty strings, got {bad!r}")
        tensors = {k: _host(v, f"dict entry {k!r}") for k, v in obj.items()}
        meta["kind"] = "dict"
    elif isinstance(obj, list | tuple):
        tensors = {str(i): _host(v, f"element {i} of the {type(obj).__name__}") for i, v in enumerate(obj)}
        meta["kind"] = type(obj).__name__
    else:
        tensors = {"array": _host(obj, "the object")}
        meta["kind"] = "array"
    meta["keys"] = json.dumps(list(tensors))
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"lm.save: metadata must map str to str, got {k!r}: {v!r}")
        meta.setdefault(k, v)
    _atomic_write(Path(path), tensors, meta, durable)


def _module_tensors(model: Module):
    idx = model._index()
    missing = [path for path, p in idx.entries if not p.is_built]
    if missing:
        raise CheckpointError(f"cannot save {type(model).__name__}: parameters {missing} have no shape yet; call "
                              "the model once or use model.build(input_shape) first")
    tensors, stored = {}, {}
    for path, p in idx.entries:
        if getattr(p, "persistent", True):
            tensors[path] = _host(p.value, f"parameter {path!r}")
            stored[id(p)] = path
    aliases = {path: stored[id(p)] for path, p in idx.paths.items() if id(p) in stored and stored[id(p)] != path}
    return tensors, aliases


def _host(x, what: str) -> np.ndarray:
    b = backend_of(x)
    if b is None:
        if isinstance(x, np.generic):
            return np.asarray(x)
        raise TypeError(f"lm.save: {what} is a {type(x).__name__}; only arrays (torch, jax, numpy) can be saved")
    a = b.to_numpy(x)
    if a.dtype.kind == "c" and a.dtype != np.complex64:
        raise TypeError(f"lm.save: {what} has dtype {a.dtype}; safetensors stores complex64 but not {a.dtype}")
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (ascontiguousarray makes 0-d arrays 1-d)


def _atomic_write(path: Path, tensors: dict, meta: dict, durable: bool) -> None:
    import safetensors.numpy

    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"cannot save to '{path}': folder '{folder}' does not exist")
    if path.is_dir():
        raise CheckpointError(f"cannot save to '{path}': it is a folder")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        safetensors.numpy.save_file(tensors, tmp, metadata=meta)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # the data must be on disk before the rename makes it the checkpoint
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise CheckpointError(f"saving '{path}' failed ({e.strerror or e}); the previous file, if any, is "
                                  "unchanged") from e
        raise
    if not durable:
        return
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX; harmless elsewhere)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _version() -> str:
    from .version import __version__

    return __version__


# ----- reading ------------------------------------------------------------------------------------
class _Reader:
    """An open checkpoint: header (keys, shapes, dtypes, metadata) first, tensor data on demand."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"cannot load '{self.path}': no such file")
        if self.path.is_dir():
            raise CheckpointError(f"cannot load '{self.path}': it is a folder")
        try:
            self._cm = safe_open(str(self.path), framework="np")
            self._f = self._cm.__enter__()
            self.meta = self._f.metadata() or {}
            self.keys = list(self._f.keys())
            self.specs = {}
            for k in self.keys:
                sl = self._f.get_slice(k)
                self.specs[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot load '{self.path}': {_diagnose_file(self.path)} ({e})") from None
        self._offsets = self._data_offsets()
        self._raw = None
        order = self.meta.get("keys")
        if order:
            try:
                ordered = json.loads(order)
                if sorted(ordered) == sorted(self.keys):
                    self.keys = ordered
            except ValueError:
                pass
        if self.meta.get("format") == "lamina":
            try:
                version = int(self.meta.get("format_version", "0"))
            except ValueError:
                version = -1
            if not 1 <= version <= FORMAT_VERSION:
                raise CheckpointError(f"cannot load '{self.path}': lamina checkpoint format version "
                                      f"{self.meta.get('format_version')!r} is not one this lamina "
                                      f"({_version()}) reads (1 to {FORMAT_VERSION}); upgrade lamina")

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "dict")

    @property
    def aliases(self) -> dict:
        try:
            return json.loads(self.meta.get("aliases", "{}"))
        except ValueError as e:
            raise CheckpointError(f"cannot load '{self.path}': its 'aliases' metadata is not valid JSON") from e

    def _data_offsets(self):
        """{key: (file offset, byte count)} from the header that safetensors has just validated, or None
        where the raw bytes cannot be used as they are (a big-endian machine)."""
        if sys.byteorder != "little":
            return None
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                for k, v in header.items() if k != "__metadata__"}

    def read_into(self, key, out: np.ndarray) -> bool:
        """Read tensor ``key`` straight into ``out``'s memory (one copy, no memory map). False when the
        bytes cannot go there directly (then use ``get``)."""
        if self._offsets is None or not out.flags.c_contiguous or not out.flags.writeable:
            return False
        offset, count = self._offsets[key]
        buf = memoryview(out.reshape(-1).view(np.uint8))
        if len(buf) != count:
            return False
        if self._raw is None:
            self._raw = open(self.path, "rb", buffering=0)  # unbuffered: readinto goes straight to `out`
        self._raw.seek(offset)
        done = 0
        while done < count:  # 8 MiB at a time: measured steadier than one huge read into fresh pages
            got = self._raw.readinto(buf[done:done + (8 << 20)])
            if got <= 0:
                raise CheckpointError(f"cannot read tensor {key!r} of '{self.path}': the file ended early "
                                      "(was it changed while loading?)")
            done += got
        return True

    def get(self, key) -> np.ndarray:
        """Tensor ``key`` as a new NumPy array."""
        shape, dtype = self.specs[key]
        if dtype in _ST_DTYPES.values():
            from .parameter import _np_dtype

            out = np.empty(shape, _np_dtype(dtype))
            # Touch the new pages first: page faults taken inside the kernel's read were measured to make
            # loads bimodal (0.06 s or 0.34 s for 384 MB); faulting them here is steady (~0.09 s).
            out.reshape(-1).view(np.uint8)[::4096] = 0
            if self.read_into(key, out):
                return out
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key!r} of '{self.path}': {e}") from None

    def close(self):
        if self._raw is not None:
            self._raw.close()
        self._cm.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _diagnose_file(path: Path) -> str:
    """Say in words what is wrong with a file that safetensors refused."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = f.read(n) if 0 <= n <= size - 8 else b""
    except OSError as e:
        return f"it cannot be read: {e.strerror}"
    if size == 0:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return ("it looks like a pickle or torch.save file; lamina never unpickles (loading a pickle can run "
                "arbitrary code). Convert it once, in a trusted session, with lm.save(torch.load(...), path)")
    if size < 8:
        return "it is too short to be a safetensors file (truncated?)"
    if n > size - 8:
        return (f"it is not a safetensors file, or it is truncated: its header claims {n} bytes but the file has "
                f"{size} bytes in all")
    try:
        entries = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        return "its header is not valid safetensors JSON (the file is damaged)"
    if 8 + n + end > size:
        return f"it is truncated: its header describes {8 + n + end} bytes but the file has only {size}"
    return "it is not a valid safetensors file (damaged)"


def load(path, backend=None, device=None):
    """Load what ``save`` wrote: an array, a list, a tuple or a dict of arrays (a model checkpoint gives
    its ``{path: array}`` state dict). ``backend=`` picks the kind of arrays returned (default: the
    current backend); ``device=`` where they go. Any safetensors file loads, as a dict.
    """
    b = get_backend(backend)
    with _Reader(path) as r:
        arrays = {k: b.from_numpy(r.get(k), device, copy=False) for k in r.keys}
        kind = r.kind
    arrays = {k: v for k, v in arrays.items() if not k.startswith(_OPTIM)}
    if kind == "array":
        return arrays["array"]
    if kind in ("list", "tuple"):
        items = [arrays[str(i)] for i in range(len(arrays))]
        return items if kind == "list" else tuple(items)
    return arrays


def load_into(model: Module, path, *, strict: bool = True, allow_missing: bool = False,
              ignore_extra: bool = False, optimizer=None) -> Module:
    """Load a checkpoint file into ``model``'s parameters and buffers, all or nothing.

    See ``Module.load_state_dict`` for the rules. Tied parameters recorded in the file are tied in
    ``model`` too. With ``optimizer``, its state and step count are restored from the file as well
    (the file must hold them). Returns the model.
    """
    with _Reader(path) as r:
        specs = {k: v for k, v in r.specs.items() if not k.startswith(_OPTIM)}
        optim_keys = [k for k in r.keys if k.startswith(_OPTIM)]
        if optimizer is not None and not optim_keys:
            raise CheckpointError(f"cannot restore the optimizer from '{r.path}': it holds no optimizer state "
                                  "(save it with lm.save(model, path, optimizer=opt))")
        if optimizer is not None and r.meta.get("optimizer") not in (None, type(optimizer).__name__):
            raise CheckpointError(f"'{r.path}' holds {r.meta['optimizer']} state; cannot restore a "
                                  f"{type(optimizer).__name__} from it")
        plan = plan_load(model, specs, r.aliases, allow_missing or not strict, ignore_extra or not strict,
                     source=f"'{r.path}'")
        apply_load(model, plan, r.get, reader=r)
        if optimizer is not None:
            optimizer.load_state_dict({k[len(_OPTIM):]: r.get(k) for k in optim_keys},
                                      steps=int(r.meta.get("optimizer_steps", "0")))
    return model
