"""Checkpoints in the safetensors format: arrays, collections of arrays and model parameters.

Files are plain safetensors, so ``safetensors.numpy.load_file`` and every other safetensors reader opens
them. Nothing is ever unpickled. A save writes a temporary file in the target's folder
(``.<name>.lamina-tmp-<pid>-<random>``), flushes it to disk and renames it over the target, so a crash,
a kill or a full disk mid-save leaves the previous file as it was; the temporary files of a save that was
killed are removed by the next save to the same path. The process umask is never touched: a new file gets
the permissions the umask gives, a replaced file keeps the old file's permissions.

A load opens the file once and reads everything (header, then data) through that one descriptor, so a
save that renames a new file over the path meanwhile cannot mix two files. Anything that is not a regular
file (a FIFO, a device) is refused at once. The header is validated completely before any value is used
(a safetensors header as the format defines it; lamina's metadata: kind, key order, aliases), and every
problem is a ``CheckpointError`` that names the file.

Loading into a model is strict and all-or-nothing. Every key, shape, dtype and tie in the file's header is
checked against the model before any value is written, and all problems are reported in one
``CheckpointError``. The values are then copied one tensor at a time, so a load needs little memory
beyond the model itself. With ``optimizer=``, the optimizer state is read and restored before the weights
are written, and a state the optimizer refuses changes neither.

Metadata in each file (``__metadata__`` of the safetensors header, all strings): ``format`` ("lamina"),
``format_version``, ``lamina_version``, ``kind`` (array, list, tuple, dict or module), ``keys`` (the
original order), and for modules ``class`` and ``aliases`` (tied parameters: ``{alias path: stored path}``),
and with an optimizer ``optimizer`` (its class) and ``optimizer_steps``.

Dtype policy when loading into a model: a floating-point value loads into a floating-point parameter of
another precision by casting to the parameter's dtype (as ``torch.Tensor.copy_`` does); an integer loads
into an integer type that holds all its values (int32 into int64, as a jax checkpoint does into torch);
any other difference (int into float, float into int, int64 into int32, bool) is a mismatch and is
reported.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import secrets
import stat
import sys
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
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "C64": 8}
_MAX_HEADER = 100_000_000  # bytes; the limit the safetensors library itself enforces
_KINDS = ("array", "list", "tuple", "dict", "module")
_TMP = ".lamina-tmp-"  # temporary files are named .<target name>.lamina-tmp-<pid>-<random>


# ----- writing ------------------------------------------------------------------------------------
_OPTIM = "@optimizer/"  # key prefix of optimizer state in a model checkpoint


def save(obj, path, *, metadata: dict | None = None, durable: bool = True, optimizer=None) -> None:
    """Save a model's parameters, one array, a list or tuple of arrays, or a dict of str -> array.

    Arrays may come from any backend; each keeps its dtype exactly (bfloat16 through ml_dtypes).
    A model is saved as its ``state_dict()`` (tied parameters once, with their aliases recorded).
    ``metadata``: extra ``{str: str}`` entries for the file's header. Keys ``__metadata__`` and keys that
    start with ``@optimizer/`` are reserved by the format and refused.

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
        _refuse_reserved(tensors, "parameter path")
        meta.update(kind="module", aliases=json.dumps(aliases), **{"class": type(obj).__name__})
        if optimizer is not None:
            for k, v in optimizer.state_dict().items():
                tensors[_OPTIM + k] = _savable(v, f"optimizer state {k!r}")
            meta.update(optimizer=type(optimizer).__name__, optimizer_steps=str(int(optimizer.steps)))
    elif optimizer is not None:
        raise TypeError("lm.save: optimizer= goes with a model checkpoint")
    elif isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str) or not k]
        if bad:
            raise TypeError(f"lm.save: dict keys must be non-empty strings, got {bad!r}")
        _refuse_reserved(obj, "dict key")
        tensors = {k: _savable(v, f"dict entry {k!r}") for k, v in obj.items()}
        meta["kind"] = "dict"
    elif isinstance(obj, list | tuple):
        tensors = {str(i): _savable(v, f"element {i} of the {type(obj).__name__}") for i, v in enumerate(obj)}
        meta["kind"] = type(obj).__name__
    else:
        tensors = {"array": _savable(obj, "the object")}
        meta["kind"] = "array"
    meta["keys"] = json.dumps(list(tensors))
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"lm.save: metadata must map str to str, got {k!r}: {v!r}")
        meta.setdefault(k, v)
    _atomic_write(Path(path), tensors, meta, durable)


def _refuse_reserved(keys, what: str) -> None:
    for k in keys:
        if k == "__metadata__":
            raise CheckpointError(f"lm.save: {what} '__metadata__' is reserved by the safetensors format (the "
                                  "header entry that holds the file's metadata); rename that entry. Nothing "
                                  "was written.")
        if k.startswith(_OPTIM):
            raise CheckpointError(f"lm.save: {what} {k!r} starts with {_OPTIM!r}, which lamina reserves for "
                                  "optimizer state (lm.save(model, path, optimizer=opt)); rename that entry. "
                                  "Nothing was written.")


def _module_tensors(model: Module):
    idx = model._index()
    missing = [path for path, p in idx.entries if not p.is_built]
    if missing:
        raise CheckpointError(f"cannot save {type(model).__name__}: parameters {missing} have no shape yet; call "
                              "the model once or use model.build(input_shape) first")
    tensors, stored = {}, {}
    for path, p in idx.entries:
        if getattr(p, "persistent", True):
            tensors[path] = _savable(p.value, f"parameter {path!r}")
            stored[id(p)] = path
    aliases = {path: stored[id(p)] for path, p in idx.paths.items() if id(p) in stored and stored[id(p)] != path}
    return tensors, aliases


def _savable(x, what: str) -> np.ndarray:
    b = backend_of(x)
    if b is None:
        if isinstance(x, np.generic):
            x = np.asarray(x)
        else:
            raise TypeError(f"lm.save: {what} is a {type(x).__name__}; only arrays (torch, jax, numpy) can be "
                            "saved")
        a = x
    else:
        a = b.to_numpy(x)
    if a.dtype.name not in _ST_CODES:
        if a.dtype.kind == "c":
            raise TypeError(f"lm.save: {what} has dtype {a.dtype}; safetensors stores complex64 but not {a.dtype}")
        raise TypeError(f"lm.save: {what} has dtype {a.dtype}, which safetensors cannot store; it stores "
                        f"{', '.join(_ST_CODES)}")
    if sys.byteorder != "little" or a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))  # safetensors data is little-endian
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (ascontiguousarray makes 0-d arrays 1-d)


def _serialize_header(tensors: dict, meta: dict) -> tuple[bytes, list]:
    """The safetensors header (8-byte length + JSON, padded to 8 bytes) and the order to write the data in:
    widest items first, so that every tensor starts at a multiple of its item size."""
    order = sorted(tensors, key=lambda k: -tensors[k].dtype.itemsize)  # stable: same size keeps save order
    header: dict = {"__metadata__": meta}
    offset = 0
    for k in order:
        a = tensors[k]
        header[k] = {"dtype": _ST_CODES[a.dtype.name], "shape": list(a.shape),
                     "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, order


def _write_all(fd: int, data) -> None:
    """Write all of ``data`` (bytes or a memoryview) to ``fd``; OSError (a full disk: ENOSPC) passes out."""
    view = memoryview(data).cast("B")
    done, n = 0, len(view)
    while done < n:
        done += os.write(fd, view[done:done + (1 << 30)])


def _atomic_write(path: Path, tensors: dict, meta: dict, durable: bool) -> None:
    if path.is_symlink():  # write the file the link points to (as open() would), and keep the link
        path = Path(os.path.realpath(path))
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"cannot save to '{path}': folder '{folder}' does not exist")
    if path.is_dir():
        raise CheckpointError(f"cannot save to '{path}': it is a folder")
    header, order = _serialize_header(tensors, meta)
    _remove_stale_temps(folder, path.name)
    fd, tmp = -1, None
    try:
        fd, tmp = _create_temp(folder, path.name)
        with contextlib.suppress(OSError):  # a replaced file keeps its permissions (no umask games)
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
        _write_all(fd, header)
        for k in order:
            a = tensors[k]
            if a.nbytes:
                _write_all(fd, a.reshape(-1).view(np.uint8))
        if durable:
            os.fsync(fd)  # the data must be on disk before the rename makes it the checkpoint
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException as e:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if tmp is not None:
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


def _create_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new temporary file beside the target, created with mode 0o666 so that the umask applies as it
    does to any new file (the process umask is never changed: other threads may be creating files)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}{_TMP}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder))


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Remove the temporary files of earlier saves to ``name`` whose process is gone (killed mid-save).
    A file whose process still runs (another thread or process saving now) is left alone. POSIX only:
    elsewhere there is no safe way to ask whether a process lives."""
    if os.name != "posix":
        return
    prefix = f".{name}{_TMP}"
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        pid_text = entry[len(prefix):].partition("-")[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, entry))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or not a pid we can ask about): leave its file alone
    return True


def _version() -> str:
    from .version import __version__

    return __version__


# ----- reading ------------------------------------------------------------------------------------
class _Reader:
    """An open checkpoint: one descriptor, the validated header (keys, shapes, dtypes, metadata) first,
    tensor data on demand, always from that same descriptor."""

    def __init__(self, path):
        self.path = Path(path)
        self._fd = _open_regular(self.path)
        self._raw = io.FileIO(self._fd, "rb", closefd=False)  # unbuffered: readinto goes straight to memory
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"cannot load '{self.path}': {why}")

    def _pread(self, offset: int, count: int) -> bytes:
        self._raw.seek(offset)
        out = bytearray()
        while len(out) < count:
            chunk = self._raw.read(count - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def _parse(self) -> None:
        size = os.fstat(self._fd).st_size
        head = self._pread(0, 8)
        if size == 0:
            raise self._bad("the file is empty")
        if (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80") and (  # a header length can start with 0x80
                size < 8 or int.from_bytes(head, "little") > size - 8):
            raise self._bad("it looks like a pickle or torch.save file; lamina never unpickles (loading a pickle "
                            "can run arbitrary code). Convert it once, in a trusted session, with "
                            "lm.save(torch.load(...), path)")
        if size < 8:
            raise self._bad("it is too short to be a safetensors file (truncated?)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise self._bad(f"it is not a safetensors file, or it is truncated: its header claims {n} bytes but "
                            f"the file has {size} bytes in all")
        if n > _MAX_HEADER:
            raise self._bad(f"its header claims {n} bytes, more than the {_MAX_HEADER} that safetensors allows "
                            "(not a safetensors file?)")
        try:
            header = json.loads(self._pread(8, n).decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._bad(f"its header is not valid safetensors JSON (the file is damaged): {_short(e)}") \
                from None
        if not isinstance(header, dict):
            raise self._bad(f"its header is a JSON {type(header).__name__}, not an object (the file is damaged)")
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._bad("its __metadata__ is not a mapping of strings to strings (the file is damaged)")
        self.meta = meta
        self.specs, spans = {}, []
        for key, e in header.items():
            shape, dtype = self._entry(key, e)
            self.specs[key] = (shape, _ST_DTYPES[dtype])
            spans.append((e["data_offsets"][0], e["data_offsets"][1], key))
        spans.sort()
        end = 0
        for begin, stop, key in spans:
            if begin != end:
                raise self._bad(f"the data of tensor {key!r} starts at byte {begin}, expected {end} (tensors must "
                                "be stored back to back: the header is damaged)")
            end = stop
        if 8 + n + end > size:
            raise self._bad(f"it is truncated: its header describes {8 + n + end} bytes but the file has only "
                            f"{size}")
        if 8 + n + end < size:
            raise self._bad(f"its header describes {8 + n + end} bytes but the file has {size} (damaged, or "
                            "something was appended)")
        self._offsets = {k: (8 + n + b, s - b) for b, s, k in spans}
        self.keys = list(header)
        if meta.get("format") == "lamina":
            self._lamina_meta()

    def _entry(self, key: str, e) -> tuple[tuple, str]:
        where = f"tensor {key!r}"
        if not isinstance(e, dict):
            raise self._bad(f"the header entry of {where} is not an object (the file is damaged)")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise self._bad(f"{where} has dtype {dtype!r}; lamina reads {', '.join(_ST_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > 64
                or not all(type(d) is int and 0 <= d < 2**62 for d in shape)):
            raise self._bad(f"{where} has shape {_short(shape)}; a shape is a list of at most 64 non-negative "
                            "integers (the header is damaged)")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise self._bad(f"{where} has data_offsets {_short(offsets)}; expected [begin, end] with "
                            "0 <= begin <= end (the header is damaged)")
        if math.prod(max(d, 1) for d in shape) * _ITEMSIZE[dtype] >= 2**62:
            raise self._bad(f"{where} has an impossible shape {tuple(shape)} (the header is damaged)")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise self._bad(f"{where} has shape {tuple(shape)} and dtype {dtype}, which take {nbytes} bytes, but "
                            f"its data_offsets span {offsets[1] - offsets[0]} bytes (the header is damaged)")
        return tuple(shape), dtype

    def _lamina_meta(self) -> None:
        """Check lamina's own metadata against the file: version, kind, key order, aliases, step count."""
        meta = self.meta
        try:
            version = int(meta.get("format_version", "0"))
        except ValueError:
            version = -1
        if not 1 <= version <= FORMAT_VERSION:
            raise self._bad(f"lamina checkpoint format version {meta.get('format_version')!r} is not one this "
                            f"lamina ({_version()}) reads (1 to {FORMAT_VERSION}); upgrade lamina")
        kind = meta.get("kind", "dict")
        if kind not in _KINDS:
            raise self._bad(f"its metadata 'kind' is {_short(kind)}, not one of {', '.join(_KINDS)} (the header "
                            "is damaged)")
        if "keys" in meta:
            order = self._json_meta("keys")
            if (not isinstance(order, list) or not all(isinstance(k, str) for k in order)
                    or len(order) != len(self.keys) or set(order) != set(self.keys)):
                raise self._bad("its metadata 'keys' is not a list of the file's tensor names (the header is "
                                "damaged)")
            self.keys = order
        names = set(self.keys)
        want = {"array"} if kind == "array" else None
        if kind in ("list", "tuple"):
            want = {str(i) for i in range(len(names))}
        if want is not None and names != want:
            raise self._bad(f"it says it holds a {kind} but its tensors are named {_short(sorted(names))} (the "
                            "header is damaged)")
        aliases = self._json_meta("aliases") if "aliases" in meta else {}
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise self._bad("its metadata 'aliases' is not a mapping of parameter paths to stored paths (the "
                            "header is damaged)")
        for alias, target in aliases.items():
            if target not in names or target.startswith(_OPTIM) or alias in names or alias == target:
                raise self._bad(f"its metadata ties {alias!r} to {target!r}, but the file "
                                + ("stores a tensor under the alias itself" if alias in names else
                                   "holds no such parameter tensor") + " (the header is damaged)")
        self.aliases = aliases
        steps = meta.get("optimizer_steps", "0")
        if not (steps.isdigit() and steps.isascii()):
            raise self._bad(f"its metadata 'optimizer_steps' is {_short(steps)}, not a step count (the header is "
                            "damaged)")

    def _json_meta(self, name: str):
        try:
            return json.loads(self.meta[name])
        except (ValueError, RecursionError):
            raise self._bad(f"its metadata {name!r} is not valid JSON (the header is damaged)") from None

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "dict") if self.meta.get("format") == "lamina" else "dict"

    aliases: dict = {}

    def read_into(self, key, out: np.ndarray) -> bool:
        """Read tensor ``key`` straight into ``out``'s memory (one copy, no memory map). False when the
        bytes cannot go there directly (then use ``get``)."""
        if not out.flags.c_contiguous or not out.flags.writeable:
            return False
        offset, count = self._offsets[key]
        buf = memoryview(out.reshape(-1).view(np.uint8))
        if len(buf) != count:
            return False
        self._raw.seek(offset)
        done = 0
        while done < count:  # 8 MiB at a time: measured steadier than one huge read into fresh pages
            got = self._raw.readinto(buf[done:done + (8 << 20)])
            if not got:
                raise self._bad(f"tensor {key!r} ends early: another program cut the file short while it was "
                                "being loaded (lamina's own saves never change a file in place); a model being "
                                "loaded from it may be partly updated: load again from a whole file")
            done += got
        if sys.byteorder != "little" and out.dtype.itemsize > 1:
            out.byteswap(inplace=True)
        return True

    def get(self, key) -> np.ndarray:
        """Tensor ``key`` as a new NumPy array."""
        from .parameter import _np_dtype

        shape, dtype = self.specs[key]
        out = np.empty(shape, _np_dtype(dtype))
        # Touch the new pages first: page faults taken inside the kernel's read were measured to make
        # loads bimodal (0.06 s or 0.34 s for 384 MB); faulting them here is steady (~0.09 s).
        out.reshape(-1).view(np.uint8)[::4096] = 0
        self.read_into(key, out)
        return out

    def close(self):
        if self._fd >= 0:
            self._raw.close()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_regular(path: Path) -> int:
    """Open ``path`` for reading and make sure it is a regular file, without blocking: a FIFO opened
    for reading would otherwise wait for a writer forever."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"cannot load '{path}': no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"cannot load '{path}': it is a folder") from None
    except OSError as e:
        raise CheckpointError(f"cannot load '{path}': it cannot be opened ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise CheckpointError(f"cannot load '{path}': it is a folder")
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"cannot load '{path}': it is not a regular file (a FIFO, socket or device); "
                                  "lamina loads checkpoints only from regular files")
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = [k for k, _ in pairs]
        raise ValueError(f"duplicate key {next(k for k in seen if seen.count(k) > 1)!r}")
    return d


def _short(x, limit: int = 80) -> str:
    text = repr(x) if not isinstance(x, BaseException) else str(x)
    return text if len(text) <= limit else text[:limit] + "..."


def load(path, backend=None, device=None):
    """Load what ``save`` wrote: an array, a list, a tuple or a dict of arrays (a model checkpoint gives
    its ``{path: array}`` state dict). ``backend=`` picks the kind of arrays returned (default: the
    current backend); ``device=`` where they go. Any safetensors file loads, as a dict.

    The file is read through one descriptor and fully validated first; any problem with it is a
    ``CheckpointError`` that names it.
    """
    b = get_backend(backend)
    with _Reader(path) as r:
        kind = r.kind
        arrays = {k: b.from_numpy(r.get(k), device, copy=False) for k in r.keys if not k.startswith(_OPTIM)}
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
    ``model`` too (and a tie in the model that the file does not have is an error). With ``optimizer``,
    its state and step count are restored from the file as well (the file must hold them): the state is
    read and handed to the optimizer first, and if it refuses it, neither it nor the model changes.
    Returns the model.
    """
    with _Reader(path) as r:
        specs = {k: v for k, v in r.specs.items() if not k.startswith(_OPTIM)}
        optim_keys = [k for k in r.keys if k.startswith(_OPTIM)]
        if r.meta.get("format") != "lamina":
            _refuse_ambiguous_layouts(r, model, specs)
        if optimizer is not None:
            _check_optimizer_file(r, optimizer, optim_keys)
        plan = plan_load(model, specs, r.aliases, allow_missing or not strict, ignore_extra or not strict,
                         source=f"'{r.path}'")
        if optimizer is not None:
            _restore_optimizer(r, model, optimizer, optim_keys)
        apply_load(model, plan, r.get, reader=r, source=f"'{r.path}'")
    return model


def _refuse_ambiguous_layouts(r: _Reader, model: Module, specs: dict) -> None:
    """A file Lamina did not write may hold PyTorch's layouts. Where a layer stores a weight differently from
    torch (it says so with a ``from_torch_state`` hook: ``Linear`` is (in, out), torch's (out, in)) and the
    stored weight is square, the two layouts cannot be told apart, and loading would compute something else
    without an error. Refuse and say how to choose."""
    ambiguous = []
    for mpath, m in model.named_modules():
        if not hasattr(m, "from_torch_state"):
            continue
        for name, _ in m.named_parameters():
            key = f"{mpath}.{name}" if mpath else name
            shape = specs.get(key, (None,))[0]
            if shape is not None and len(shape) == 2 and shape[0] == shape[1]:
                ambiguous.append(key)
    if ambiguous:
        raise CheckpointError(
            f"cannot tell the layout of '{r.path}': Lamina did not write it, and {ambiguous} are square, so a "
            "PyTorch (out, in) weight and Lamina's (in, out) one look the same. If the file comes from PyTorch "
            "(or Hugging Face), load it with lm.load_torch(model, lm.load(path)); if it holds Lamina's layout, "
            "load it with model.load_state_dict(lm.load(path)). Nothing was changed.")


def _check_optimizer_file(r: _Reader, optimizer, optim_keys: list) -> None:
    saved = r.meta.get("optimizer") if r.meta.get("format") == "lamina" else None
    if saved is None and not optim_keys:
        raise CheckpointError(f"cannot restore the optimizer from '{r.path}': it holds no optimizer state "
                              "(save it with lm.save(model, path, optimizer=opt))")
    if saved not in (None, type(optimizer).__name__):
        raise CheckpointError(f"'{r.path}' holds {saved} state; cannot restore a {type(optimizer).__name__} "
                              "from it")


def _restore_optimizer(r: _Reader, model: Module, optimizer, optim_keys: list) -> None:
    unbuilt = [k for k, p in model._index().entries if not p.is_built]
    if unbuilt:
        raise CheckpointError(f"cannot restore the optimizer from '{r.path}' into a model whose parameters "
                              f"{unbuilt} have no shape yet; build the model first (model.build(input_shape) or "
                              "one call), then load. Nothing was changed.")
    state = {k[len(_OPTIM):]: r.get(k) for k in optim_keys}
    steps = int(r.meta.get("optimizer_steps", "0")) if r.meta.get("format") == "lamina" else 0
    try:
        optimizer.load_state_dict(state, steps=steps)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot restore {type(optimizer).__name__} from '{r.path}': {e}. Neither the "
                              "model nor the optimizer was changed.") from e
