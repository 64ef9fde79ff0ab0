"""One on-disk format for every vqlib object: safetensors plus a JSON tree in its header.

Layout of a `.vq` file (a valid safetensors file, no pickle, memory-mappable):
- tensors: every array leaf, named by its path in the pytree (`centroids`, `stats.inertia`);
- header metadata: `format` ("vqlib"), `format_version`, `type` (the root type's name),
  `tree` (JSON: type names, static fields, and for each leaf its tensor name and dtype),
  `checksum` (sha256 over the tree and every tensor's name, dtype, shape and bytes) and, when
  saved with a key, `hmac` (HMAC-SHA256 over the same bytes).

Writes are atomic: a temporary file in the target folder (`.vqlib-<host>.<pid>.<random>.tmp`),
fsync, then rename over the target, so a crash leaves either the old file or the new one, never
half of one. A writer killed before the rename leaves its temporary file; the next save into that
folder deletes the temporary files of writers that are no longer running.

Loads trust nothing: the header is read and checked (sizes, offsets, dtypes, the tree's
structure and depth, every type name against the registered ones) before any tensor byte is
read; then the checksum; then every rebuilt object's static fields and invariants
(`vqlib._types.VALIDATORS`). Anything wrong is a ValueError naming the path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
import re
import socket
import stat
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from vqlib._types import METRICS, REGISTERED_TYPES, VALIDATORS

FORMAT = "vqlib"
FORMAT_VERSION = 1
MAX_DEPTH = 64  # nesting of types, lists and dicts a loaded tree may have (save writes a handful)
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
_MAX_NDIM = 64  # numpy's
# numpy dtypes safetensors cannot store directly: saved as a same-width unsigned view.
_VIEWED = {"bfloat16": np.uint16}
# safetensors dtype codes that vqlib writes -> numpy dtypes (safetensors is little-endian).
_STORED = {
    "BOOL": np.dtype("|b1"),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}
# dtype names a leaf of the tree may have: the stored ones and the viewed ones.
_LEAF_DTYPES = {d.name: d for d in _STORED.values()} | {name: np.dtype(v) for name, v in _VIEWED.items()}
_PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# Temporary files of save(): host and pid of the writer, so a later save can tell a dead writer's.
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
_TEMP = re.compile(r"\.vqlib-(?:(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>[0-9]+)\.)?[A-Za-z0-9_]+\.tmp")
_ORPHAN_AGE_S = 3600.0  # a temp file without a writer pid (older vqlib) is stale after an hour untouched
# The process umask, read once at import (reading it means setting it, which would race with
# other threads if done at every save).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _type_name(obj) -> str | None:
    for name, cls in REGISTERED_TYPES.items():
        if type(obj) is cls:
            return name
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ----------------------------------------------------------------------------- save


def _encode(obj, path: str, tensors: dict[str, np.ndarray], *, static: bool = False):
    """Returns the JSON node for `obj`, adding its array leaves to `tensors`. In a `static` field
    (JSON values only) a numpy scalar is written as the Python number it holds."""
    if static and isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, (tuple, list)):
        return {"list": [_encode(v, _join(path, str(i)), tensors, static=static) for i, v in enumerate(obj)]}
    if static:
        raise TypeError(
            f"cannot save static field {path}: it holds a {type(obj).__name__}; static fields hold numbers, "
            "strings, None and tuples of them (make an array a data field)"
        )
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"cannot save a dict with non-string keys at {path or 'the root'}")
        return {"dict": {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}}
    name = _type_name(obj)
    if name is not None:
        static, data = {}, {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("static"):
                static[f.name] = _encode(value, _join(path, f.name), tensors, static=True)
            else:
                data[f.name] = _encode(value, _join(path, f.name), tensors)
        return {"type": name, "static": static, "data": data}
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        if path in tensors:  # e.g. a dict key "a.b" beside a nested "a" -> "b"
            raise ValueError(f"two arrays would be saved under the name {path!r}; rename the dict key that has a '.'")
        node = {"tensor": path}
        if isinstance(obj, jax.Array) and jnp.issubdtype(obj.dtype, jax.dtypes.prng_key):
            node["prng_impl"] = str(jax.random.key_impl(obj))
            obj = jax.random.key_data(obj)
        array = np.asarray(obj, order="C")  # keeps 0-d shapes (ascontiguousarray would not)
        node["dtype"] = array.dtype.name
        if array.dtype.name in _VIEWED:
            array = array.view(_VIEWED[array.dtype.name])
        tensors[path] = array
        return node
    raise TypeError(
        f"cannot save object of type {type(obj).__name__} at {path or 'the root'}: "
        "vqlib.save writes vqlib codebooks, indexes and their arrays"
    )


def _digest(h, tree_json: str, tensors: dict[str, np.ndarray]) -> str:
    """Feeds the tree and every tensor's name, dtype, shape and bytes to the hash `h`."""
    h.update(tree_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype.str}|{t.shape}".encode())
        h.update(np.ascontiguousarray(t).reshape(-1).view(np.uint8))  # no copy of a contiguous tensor
    return h.hexdigest()


def _checksum(tree_json: str, tensors: dict[str, np.ndarray]) -> str:
    return _digest(hashlib.sha256(), tree_json, tensors)


def _mac(key: bytes, tree_json: str, tensors: dict[str, np.ndarray]) -> str:
    return _digest(hmac.new(key, digestmod=hashlib.sha256), tree_json, tensors)


def _check_key(hmac_key) -> bytes:
    if isinstance(hmac_key, str):
        hmac_key = hmac_key.encode()
    if not isinstance(hmac_key, (bytes, bytearray, memoryview)):
        raise TypeError(f"hmac_key must be bytes (or a str, used as UTF-8), got {type(hmac_key).__name__}")
    if len(hmac_key) == 0:
        raise ValueError("hmac_key is empty; pass a secret of at least 32 random bytes (e.g. os.urandom(32))")
    return bytes(hmac_key)


def _writer_alive(pid: int) -> bool:
    """Whether process `pid` (on this host) still runs; a zombie (killed, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OverflowError:
        return False  # no such pid can exist
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _remove_stale_temps(folder: str) -> None:
    """Deletes the temporary files that killed writers left in `folder`: those of this host's
    dead processes, and (from writers that did not record a pid) those untouched for an hour.
    A live writer's file is never touched."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    now = time.time()
    for name in names:
        match = _TEMP.fullmatch(name)
        if match is None:
            continue
        full = os.path.join(folder, name)
        if match["pid"] is not None:
            if match["host"] != _HOST or int(match["pid"]) == os.getpid() or _writer_alive(int(match["pid"])):
                continue
        else:
            try:
                if now - os.lstat(full).st_mtime < _ORPHAN_AGE_S:
                    continue
            except OSError:
                continue
        try:
            if stat.S_ISREG(os.lstat(full).st_mode):
                os.unlink(full)
        except OSError:
            pass  # deleted by another process's save meanwhile, or not ours to delete


def save(path: str | os.PathLike, obj, *, hmac_key: bytes | str | None = None) -> None:
    """Writes a vqlib codebook, index or compressed model to `path`, atomically.

    Args:
        path: the file to write; an existing file is replaced only once the new one is complete.
        obj: a vqlib object (codebook, index, palettized or compressed model).
        hmac_key: optional secret: the file then carries an HMAC-SHA256 of its contents, which
            `load(path, hmac_key=...)` verifies (tamper-evidence; the plain checksum only catches
            accidents, since anyone can recompute it).

    Example:
        >>> import vqlib, numpy as np, tempfile, os
        >>> cb = vqlib.fit(np.random.default_rng(0).normal(size=(100, 4)).astype("float32"), "kmeans", k=3)
        >>> path = os.path.join(tempfile.mkdtemp(), "cb.vq")
        >>> vqlib.save(path, cb)
        >>> bool((vqlib.load(path).centroids == cb.centroids).all())
        True
    """
    if _type_name(obj) is None:
        raise TypeError(f"vqlib.save expects a vqlib codebook or index, got {type(obj).__name__}")
    key = None if hmac_key is None else _check_key(hmac_key)
    tensors: dict[str, np.ndarray] = {}
    tree_json = json.dumps(_encode(obj, "", tensors), sort_keys=True)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "type": _type_name(obj),
        "tree": tree_json,
        "checksum": _checksum(tree_json, tensors),
    }
    if key is not None:
        metadata["hmac"] = _mac(key, tree_json, tensors)
    payload = safetensors.numpy.save(tensors, metadata=metadata)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    _remove_stale_temps(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".vqlib-{_HOST}.{os.getpid()}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------- load: bytes


class _Malformed(Exception):
    """A tree that vqlib.save cannot have written; load() turns it into a ValueError."""


class _Invalid(Exception):
    """A well-formed tree whose rebuilt object breaks its type's invariants."""


def _unreadable(path: str, detail: str) -> ValueError:
    return ValueError(f"{path} is not a readable vqlib file (truncated, corrupted, or not a vqlib file?): {detail}")


def _file_kind(mode: int) -> str:
    for test, kind in [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]:
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular(path: str):
    """The file opened for reading, after checking it is a regular file (a pipe or a device could
    block or never end). FileNotFoundError / PermissionError pass through."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is {_file_kind(mode)}, not a file; pass the path of a file written by vqlib.save")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode  # replaced between the stat and the open?
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ValueError(f"{path} is {_file_kind(mode)}, not a file; pass the path of a file written by vqlib.save")
    return os.fdopen(fd, "rb")


def _read_exact(f, nbytes: int, path: str, what: str) -> bytearray:
    buf = bytearray(nbytes)
    view, done = memoryview(buf), 0
    while done < nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise _unreadable(path, f"the file ends inside {what} ({done} of {nbytes} bytes)")
        done += got
    return buf


def _strict_json(text, path: str, what: str):
    """json.loads that turns every failure (bad syntax, bad UTF-8, deep nesting, huge numbers)
    into a ValueError naming the path."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _unreadable(path, f"{what} nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _unreadable(path, f"{what} is not valid JSON ({e})") from None


def _read_header(f, path: str, size: int) -> tuple[dict, int]:
    """(the safetensors header as a dict, offset of the tensor data)."""
    if size < 8:
        raise _unreadable(path, f"{size} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(_read_exact(f, 8, path, "the header length"), "little")
    if length > size - 8:
        raise _unreadable(path, f"the header claims {length} bytes but the file has {size - 8} after the length")
    if length > MAX_HEADER_BYTES:
        raise _unreadable(path, f"the header claims {length} bytes, more than the {MAX_HEADER_BYTES} allowed")
    header = _strict_json(bytes(_read_exact(f, length, path, "the header")), path, "the safetensors header")
    if not isinstance(header, dict):
        raise _unreadable(path, f"the header is a JSON {type(header).__name__}, not an object")
    return header, 8 + length


def _check_metadata(metadata, path: str) -> dict[str, str]:
    """The vqlib metadata, checked: format, version, and the type of every field."""
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a vqlib file (no vqlib header); write it with vqlib.save"
        )
    version = metadata.get("format_version")
    if not isinstance(version, str) or re.fullmatch(r"[1-9][0-9]{0,8}", version) is None:
        raise ValueError(
            f"{path} has a malformed vqlib header (format_version {version!r}, expected a positive integer "
            "such as '1'); the file is damaged"
        )
    if int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses vqlib format version {version}, newer than this vqlib reads ({FORMAT_VERSION}); upgrade vqlib"
        )
    for name in ("type", "tree", "checksum"):
        if not isinstance(metadata.get(name), str):
            raise ValueError(f"{path} has a malformed vqlib header (no {name} string); the file is damaged")
    if re.fullmatch(r"[0-9a-f]{64}", metadata["checksum"]) is None:
        raise ValueError(f"{path} has a malformed vqlib header (checksum is not a sha256 hex digest)")
    if "hmac" in metadata and (
        not isinstance(metadata["hmac"], str) or re.fullmatch(r"[0-9a-f]{64}", metadata["hmac"]) is None
    ):
        raise ValueError(f"{path} has a malformed vqlib header (hmac is not a sha256 hex digest)")
    return metadata


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entries(header: dict, path: str, data_size: int) -> dict[str, tuple[np.dtype, tuple, int, int]]:
    """name -> (dtype, shape, begin, end) of every tensor, checked against each other and the
    file's size: known dtypes, shapes whose bytes match the offsets, tensors tiling the data."""
    entries = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise _unreadable(path, f"tensor {name!r} has a malformed header entry")
        dtype = _STORED.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dtype is None:
            raise _unreadable(path, f"tensor {name!r} has dtype {e['dtype']!r}, which vqlib does not write")
        shape, offsets = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_int(s) and s >= 0 for s in shape):
            raise _unreadable(path, f"tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _unreadable(path, f"tensor {name!r} has data offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise _unreadable(path, f"tensor {name!r} spans bytes {begin}..{end} of a {data_size}-byte data section")
        if math.prod(s for s in shape if s) * dtype.itemsize > 2**62:  # numpy could not make it, even empty
            raise _unreadable(path, f"tensor {name!r} has shape {tuple(shape)}, too large for any array")
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise _unreadable(
                path, f"tensor {name!r} of shape {tuple(shape)} {dtype.name} would take "
                f"{math.prod(shape) * dtype.itemsize} bytes, its offsets give {end - begin}"
            )  # fmt: skip
        entries[name] = (dtype, tuple(shape), begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise _unreadable(path, f"tensor {name!r} starts at byte {begin}, the previous one ends at {position}")
        position = end
    if position != data_size:
        raise _unreadable(path, f"the tensors end at byte {position} of a {data_size}-byte data section")
    return entries


def _read_tensors(f, entries: dict, data_start: int, path: str) -> dict[str, np.ndarray]:
    """Every tensor, read in file order into its own array (the file's bytes are held once)."""
    tensors = {}
    for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda item: item[1][2]):
        buf = np.empty(end - begin, np.uint8)
        f.seek(data_start + begin)
        done = 0
        while done < buf.size:
            got = f.readinto(memoryview(buf)[done:])
            if not got:
                raise _unreadable(path, f"the file ends inside tensor {name!r}")
            done += got
        tensors[name] = buf.view(dtype).reshape(shape)
    return tensors


# ----------------------------------------------------------------------------- load: the tree


def _static_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("static")}


def _check_node(node, where: str, depth: int, context: str, entries: dict, used: set) -> None:
    """Checks one node of the tree, and below it, before any tensor is read: the node kinds save
    writes, in the places it writes them, to at most MAX_DEPTH levels; registered type names
    with their exact fields; tensors that exist in the header with the dtype the tree says, each
    used once. `context`: "static" (JSON values only), "data" (arrays, types, None) or "root"."""
    at = where or "the root"
    if depth > MAX_DEPTH:
        raise _Malformed(f"the tree nests deeper than {MAX_DEPTH} levels at {at}")
    kinds = [k for k in ("value", "list", "dict", "type", "tensor") if isinstance(node, dict) and k in node]
    if len(kinds) != 1:
        raise _Malformed(f"node at {at} is {str(node)[:80]!r}, not one of the nodes vqlib.save writes")
    kind = kinds[0]
    allowed = {"type": {"type", "static", "data"}, "tensor": {"tensor", "dtype", "prng_impl"}}.get(kind, {kind})
    if not set(node) <= allowed:
        raise _Malformed(f"node at {at} has unexpected keys {sorted(set(node) - allowed)}")
    if context == "root" and kind != "type":
        raise _Malformed(f"the root is a {kind}, not a vqlib object")
    if context == "static" and kind not in ("value", "list"):
        raise _Malformed(f"static field {at} holds a {kind}; static fields hold numbers, strings and tuples of them")
    if kind == "value":
        value = node["value"]
        if value is not None and context == "data":
            raise _Malformed(f"data field {at} holds {str(value)[:80]!r}, not an array")
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise _Malformed(f"value at {at} is a JSON {type(value).__name__}")
    elif kind == "list":
        if not isinstance(node["list"], list):
            raise _Malformed(f"list at {at} is a JSON {type(node['list']).__name__}")
        for i, child in enumerate(node["list"]):
            _check_node(child, _join(where, str(i)), depth + 1, context, entries, used)
    elif kind == "dict":
        if not isinstance(node["dict"], dict):
            raise _Malformed(f"dict at {at} is a JSON {type(node['dict']).__name__}")
        for k, child in node["dict"].items():
            _check_node(child, _join(where, k), depth + 1, context, entries, used)
    elif kind == "type":
        name = node["type"]
        cls = REGISTERED_TYPES.get(name) if isinstance(name, str) else None
        if cls is None:
            raise _Malformed(
                f"{at} is of type {str(name)[:80]!r}, which this vqlib does not know (only registered vqlib "
                "types load); import the module that defines it or upgrade vqlib"
            )
        static, data = node.get("static"), node.get("data")
        fields = {f.name for f in dataclasses.fields(cls)}
        if not (isinstance(static, dict) and isinstance(data, dict)):
            raise _Malformed(f"{name} at {at} lacks its static or data fields")
        if set(static) != _static_names(cls) or set(data) != fields - _static_names(cls):
            raise _Malformed(f"the fields of {name} at {at} do not match this vqlib's definition")
        for k, child in static.items():
            _check_node(child, _join(where, k), depth + 1, "static", entries, used)
        for k, child in data.items():
            _check_node(child, _join(where, k), depth + 1, "data", entries, used)
    else:
        name, dtype = node["tensor"], node.get("dtype")
        if not isinstance(name, str) or name not in entries:
            raise _Malformed(f"leaf {at} names tensor {str(name)[:80]!r}, which the file does not hold")
        if name in used:
            raise _Malformed(f"tensor {name!r} is used twice")
        used.add(name)
        if not isinstance(dtype, str) or dtype not in _LEAF_DTYPES:
            raise _Malformed(f"leaf {at} has dtype {str(dtype)[:40]!r}")
        if entries[name][0] != _LEAF_DTYPES[dtype]:
            raise _Malformed(f"tensor {name} is stored as {entries[name][0].name}, the tree says {dtype}")
        if "prng_impl" in node and node["prng_impl"] not in _PRNG_IMPLS:
            raise _Malformed(f"leaf {at} has PRNG implementation {str(node['prng_impl'])[:40]!r}")


def _check_tree(tree, header_type: str, entries: dict) -> None:
    used: set[str] = set()
    _check_node(tree, "", 0, "root", entries, used)
    if tree["type"] != header_type:
        raise _Malformed(f"the header says {header_type} but the tree holds {tree['type']}")
    if set(entries) - used:
        raise _Malformed(f"tensors {sorted(set(entries) - used)[:5]} are not part of the tree")


# Static-field annotations whose values load checks (a file's JSON could hold any value there).
_STATIC_TYPES = {"int": (int,), "bool": (bool,), "float": (int, float), "str": (str,), "tuple": (tuple,)}


def _check_static(cls, name: str, value) -> None:
    """TypeError when a static field's value does not have its annotated type (int, bool, float,
    str, tuple, Metric, or `X | None` of these); other annotations are left to the validators."""
    annotation = next(f.type for f in dataclasses.fields(cls) if f.name == name)
    annotation = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return
    if not all(a in _STATIC_TYPES or a in ("None", "Metric") for a in options):
        return
    if "Metric" in options and value in METRICS:
        return
    allowed = tuple(t for a in options if a in _STATIC_TYPES for t in _STATIC_TYPES[a])
    if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
        return
    raise TypeError(f"static field {name} must be {annotation}, got {value!r}")


def _decode(node, tensors: dict[str, np.ndarray], where: str = ""):
    """Rebuilds the object a checked node describes; every registered object rebuilt is checked
    (static field types, then its VALIDATORS entry), failures raised as _Invalid naming where."""
    if "value" in node:
        return node["value"]
    if "list" in node:
        return tuple(_decode(v, tensors, _join(where, str(i))) for i, v in enumerate(node["list"]))
    if "dict" in node:
        return {k: _decode(v, tensors, _join(where, k)) for k, v in node["dict"].items()}
    if "type" in node:
        cls = REGISTERED_TYPES[node["type"]]
        fields = {k: _decode(v, tensors, _join(where, k)) for k, v in (node["static"] | node["data"]).items()}
        try:
            for name in node["static"]:
                _check_static(cls, name, fields[name])
            obj = cls(**fields)
            validator = VALIDATORS.get(cls)
            if validator is not None:  # the object's own invariants: a checksum does not vouch for them
                validator(obj)
        except (_Invalid, MemoryError):
            raise
        except Exception as e:  # anything a check raises on content it does not expect is the file's fault
            detail = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise _Invalid(f"an invalid {node['type']}" + (f" at {where}" if where else "") + f": {detail}") from None
        return obj
    array = tensors.pop(node["tensor"])  # each tensor is used once: its buffer goes with the array made of it
    if node["dtype"] in _VIEWED:
        array = array.view(getattr(ml_dtypes, node["dtype"]))
    if "prng_impl" in node:
        return jax.random.wrap_key_data(jnp.asarray(array), impl=node["prng_impl"])
    if array.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        return array  # 64-bit leaves (int64 ids, float64 stats) stay numpy rather than be narrowed
    return jnp.asarray(array)


def load(path: str | os.PathLike, *, expect: type | None = None, hmac_key: bytes | str | None = None):
    """Reads an object written by `vqlib.save`, verifying everything before trusting it.

    In order: `path` is a regular file; the header (sizes, tensor offsets and dtypes, format,
    version, the tree's structure and type names) before any tensor is read; the checksum (and
    the HMAC when a key is given); then every rebuilt object's static fields and invariants.

    Args:
        path: a file written by `vqlib.save`.
        expect: if given, the type the file must hold (e.g. `vqlib.codebooks.KMeansCodebook`).
        hmac_key: the secret the file was saved with; the file must then carry a matching HMAC.

    Returns:
        The vqlib object (codebook, index, model); never a bare value or container.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the path is not a regular file, or the file is truncated, corrupted, not a
            vqlib file, from a newer format version, fails its HMAC, holds an object that breaks
            its type's invariants, or holds another type than `expect`. The message names the path.
    """
    path = os.fspath(path)
    key = None if hmac_key is None else _check_key(hmac_key)
    if expect is not None and not isinstance(expect, type):
        raise TypeError(f"expect must be a vqlib type such as vqlib.codebooks.KMeansCodebook, got {expect!r}")
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        header, data_start = _read_header(f, path, size)
        metadata = _check_metadata(header.pop("__metadata__", None), path)
        entries = _check_entries(header, path, size - data_start)
        tree_json = metadata["tree"]
        tree = _strict_json(tree_json, path, "the vqlib tree")
        try:
            _check_tree(tree, metadata["type"], entries)
        except _Malformed as e:
            raise ValueError(f"{path} holds a malformed vqlib tree ({e}); it was not written by vqlib.save") from None
        if key is not None and "hmac" not in metadata:
            raise ValueError(f"{path} carries no HMAC: it was saved without hmac_key, so its origin cannot be verified")
        tensors = _read_tensors(f, entries, data_start, path)
    if not hmac.compare_digest(_checksum(tree_json, tensors), metadata["checksum"]):
        raise ValueError(f"{path} failed its checksum: the file is corrupted; restore it from a good copy")
    if key is not None and not hmac.compare_digest(_mac(key, tree_json, tensors), metadata["hmac"]):
        raise ValueError(f"{path} failed its HMAC check: it was modified or saved with another key; do not use it")
    try:
        obj = _decode(tree, tensors)
    except _Invalid as e:
        raise ValueError(f"{path} holds {e}; the file was damaged or altered after vqlib.save wrote it") from None
    if expect is not None and type(obj) is not expect:
        raise ValueError(f"{path} holds a {_type_name(obj)}, not the expected vqlib.{expect.__qualname__}")
    return obj
