"""One on-disk format for every vqlib object: safetensors plus a JSON tree in its header.

Layout of a `.vq` file (a valid safetensors file, no pickle, memory-mappable):
- tensors: every array leaf, named by its path in the pytree (`centroids`, `stats.inertia`);
- header metadata: `format` ("vqlib"), `format_version`, `type` (the root type's name),
  `tree` (JSON: type names, static fields, and for each leaf its tensor name and dtype) and
  `checksum` (sha256 over the tree and every tensor's name, dtype, shape and bytes).

Writes are atomic: a temporary file in the target folder, fsync, then rename over the target,
so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from vqlib._types import REGISTERED_TYPES, VALIDATORS

FORMAT = "vqlib"
FORMAT_VERSION = 1
# numpy dtypes safetensors cannot store directly: saved as a same-width unsigned view.
_VIEWED = {"bfloat16": np.uint16}
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


def _encode(obj, path: str, tensors: dict[str, np.ndarray]):
    """Returns the JSON node for `obj`, adding its array leaves to `tensors`."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, (tuple, list)):
        return {"list": [_encode(v, _join(path, str(i)), tensors) for i, v in enumerate(obj)]}
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
                static[f.name] = _encode(value, _join(path, f.name), tensors)
            else:
                data[f.name] = _encode(value, _join(path, f.name), tensors)
        return {"type": name, "static": static, "data": data}
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
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


class _Malformed(Exception):
    """A tree that vqlib.save cannot have written; load() turns it into a ValueError."""


def _decode(node, tensors, *, leaf: bool = False):
    """Rebuilds the object a JSON node describes; in data fields (`leaf`), plain values other than
    None are refused: there the tree must hold arrays, vqlib types, or containers of them."""
    if not isinstance(node, dict) or len(node) == 0:
        raise _Malformed(f"node {node!r}")
    if leaf and "value" in node and node["value"] is not None:
        raise _Malformed(f"a data field holds {node!r}, not an array")
    if "value" in node:
        return node["value"]
    if "list" in node:
        return tuple(_decode(v, tensors, leaf=leaf) for v in node["list"])
    if "dict" in node:
        return {k: _decode(v, tensors, leaf=leaf) for k, v in node["dict"].items()}
    if "type" in node:
        cls = REGISTERED_TYPES.get(node["type"])
        if cls is None:
            raise ValueError(
                f"the file holds a {node['type']}, which this vqlib does not know; "
                "import the module that defines it or upgrade vqlib"
            )
        static = {f.name for f in dataclasses.fields(cls) if f.metadata.get("static")}
        if set(node["static"]) != static or set(node["data"]) | static != {f.name for f in dataclasses.fields(cls)}:
            raise _Malformed(f"the fields of {node['type']} do not match this vqlib's definition")
        fields = {k: _decode(v, tensors) for k, v in node["static"].items()}
        fields |= {k: _decode(v, tensors, leaf=True) for k, v in node["data"].items()}
        return cls(**fields)
    array = tensors[node["tensor"]]
    stored = _VIEWED.get(node["dtype"], np.dtype(node["dtype"]).type)
    if array.dtype != stored:
        raise _Malformed(f"tensor {node['tensor']} is stored as {array.dtype}, the tree says {node['dtype']}")
    if node["dtype"] in _VIEWED:
        array = array.view(getattr(ml_dtypes, node["dtype"]))
    if "prng_impl" in node:
        return jax.random.wrap_key_data(jnp.asarray(array), impl=node["prng_impl"])
    if array.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        return array  # 64-bit leaves (int64 ids, float64 stats) stay numpy rather than be narrowed
    return jnp.asarray(array)


def _checksum(tree_json: str, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(tree_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype.str}|{t.shape}".encode())
        h.update(np.ascontiguousarray(t).tobytes())
    return h.hexdigest()


def save(path: str | os.PathLike, obj) -> None:
    """Writes a vqlib codebook, index or compressed model to `path`, atomically.

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
    tensors: dict[str, np.ndarray] = {}
    tree_json = json.dumps(_encode(obj, "", tensors), sort_keys=True)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "type": _type_name(obj),
        "tree": tree_json,
        "checksum": _checksum(tree_json, tensors),
    }
    payload = safetensors.numpy.save(tensors, metadata=metadata)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".vqlib-", suffix=".tmp")
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


def load(path: str | os.PathLike, *, expect: type | None = None):
    """Reads an object written by `vqlib.save`, verifying format, version and checksum.

    Args:
        path: a file written by `vqlib.save`.
        expect: if given, the type the file must hold (e.g. `vqlib.codebooks.KMeansCodebook`).

    Raises:
        ValueError: the file is truncated, corrupted, not a vqlib file, from a newer format
            version, or holds another type than `expect`.
    """
    path = os.fspath(path)
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(f"{path} is not a readable vqlib file (truncated or corrupted?): {e}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a vqlib file (no vqlib header); write it with vqlib.save"
        )
    version = metadata.get("format_version", "")
    if not version.isdigit():
        raise ValueError(f"{path} has a malformed vqlib header (format_version {version!r}); the file is damaged")
    version = int(version)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses vqlib format version {version}, newer than this vqlib reads ({FORMAT_VERSION}); upgrade vqlib"
        )
    tree_json = metadata.get("tree", "")
    if _checksum(tree_json, tensors) != metadata.get("checksum"):
        raise ValueError(f"{path} failed its checksum: the file is corrupted; restore it from a good copy")
    try:
        obj = _decode(json.loads(tree_json), tensors)
    except (_Malformed, KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} holds a malformed vqlib tree ({e}); it was not written by vqlib.save") from None
    if _type_name(obj) != metadata.get("type"):
        raise ValueError(f"{path}: the header says {metadata.get('type')} but the tree holds {_type_name(obj)}")
    if expect is not None and type(obj) is not expect:
        raise ValueError(f"{path} holds a {_type_name(obj)}, not the expected vqlib.{expect.__qualname__}")
    validator = VALIDATORS.get(type(obj))
    if validator is not None:  # the object's own invariants: a checksum does not vouch for them
        try:
            validator(obj)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"{path} holds an invalid {_type_name(obj)}: {e}") from None
    return obj
