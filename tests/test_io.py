"""vqlib.save / vqlib.load: bit-exact round trips, the safetensors layout, atomic writes, bad files."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import vqlib
import vqlib._io
from vqlib._types import pytree_dataclass, static_field
from vqlib.codebooks import KMeansCodebook, KMeansStats


@pytree_dataclass
class _KeyHolder:
    """Test-only savable type: a typed PRNG key leaf, a nested codebook and a static field."""

    key: jax.Array
    codebook: KMeansCodebook
    tag: str = static_field("holder")


def _leaves(obj):
    return jax.tree_util.tree_leaves_with_path(obj)


def _assert_bit_exact(restored, original):
    """Same type, same tree (static fields included) and every leaf equal byte for byte, same shape."""
    assert type(restored) is type(original)
    assert jax.tree.structure(restored) == jax.tree.structure(original)
    for (path, a), (_, b) in zip(_leaves(restored), _leaves(original), strict=True):
        name = jax.tree_util.keystr(path)
        if jnp.issubdtype(b.dtype, jax.dtypes.prng_key):
            assert jnp.issubdtype(a.dtype, jax.dtypes.prng_key), name
            assert str(jax.random.key_impl(a)) == str(jax.random.key_impl(b)), name
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype, name
        assert a.tobytes() == b.tobytes(), name  # bytes, so NaN entries (inertia past num_iters) compare too
        assert a.shape == b.shape, name


@pytest.fixture
def codebook(key):
    x = jax.random.normal(key, (64, 3))
    return vqlib.fit(x, "kmeans", k=4, max_iter=5)


@pytest.fixture
def saved(tmp_path, codebook):
    path = tmp_path / "cb.vq"
    vqlib.save(path, codebook)
    return path


def _temp_files(folder):
    return sorted(p.name for p in folder.glob(".vqlib-*.tmp"))


# ----------------------------------------------------------------------------- round trips


def test_kmeans_round_trip_is_bit_exact(saved, codebook):
    assert isinstance(codebook.stats, KMeansStats)
    restored = vqlib.load(saved)
    _assert_bit_exact(restored, codebook)
    assert isinstance(restored.stats, KMeansStats)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32)
    np.testing.assert_array_equal(vqlib.encode(restored, x), vqlib.encode(codebook, x))


def test_scalar_leaves_keep_their_shape(tmp_path):
    stats = KMeansStats(inertia=jnp.zeros((2,), jnp.float32), num_iters=jnp.int32(3), num_reseeded=jnp.int32(0))
    path = tmp_path / "stats.vq"
    vqlib.save(path, stats)
    restored = vqlib.load(path, expect=KMeansStats)
    assert restored.num_iters.shape == ()
    assert restored.num_reseeded.shape == ()


def test_load_with_matching_expect(saved, codebook):
    _assert_bit_exact(vqlib.load(saved, expect=KMeansCodebook), codebook)


def test_load_accepts_str_path(saved, codebook):
    _assert_bit_exact(vqlib.load(str(saved)), codebook)


def test_bfloat16_and_prng_key_round_trip(tmp_path):
    obj = _KeyHolder(
        key=jax.random.key(3),
        codebook=KMeansCodebook(centroids=jnp.arange(6, dtype=jnp.bfloat16).reshape(3, 2) / 3),
        tag="heads-0",
    )
    path = tmp_path / "holder.vq"
    vqlib.save(path, obj)
    restored = vqlib.load(path, expect=_KeyHolder)
    _assert_bit_exact(restored, obj)
    assert restored.tag == "heads-0"
    assert restored.codebook.centroids.dtype == jnp.bfloat16
    assert restored.codebook.stats is None
    # The restored key draws the same numbers as the original.
    np.testing.assert_array_equal(jax.random.normal(restored.key, (4,)), jax.random.normal(obj.key, (4,)))


# ----------------------------------------------------------------------------- file layout


def test_file_is_valid_safetensors_with_vqlib_metadata(saved, codebook):
    with safetensors.safe_open(saved, "numpy") as f:
        metadata = f.metadata()
        names = set(f.keys())
        centroids = f.get_tensor("centroids")
    assert {"format", "format_version", "type", "tree", "checksum"} <= set(metadata)
    assert metadata["format"] == "vqlib"
    assert metadata["format_version"] == str(vqlib._io.FORMAT_VERSION)
    assert metadata["type"].endswith("KMeansCodebook")
    assert len(metadata["checksum"]) == 64 and int(metadata["checksum"], 16) >= 0  # sha256 hex
    tree = json.loads(metadata["tree"])
    assert tree["data"]["centroids"]["tensor"] == "centroids"
    assert names == {"centroids", "stats.inertia", "stats.num_iters", "stats.num_reseeded"}
    np.testing.assert_array_equal(centroids, np.asarray(codebook.centroids))


def test_bfloat16_is_stored_as_uint16_view(tmp_path):
    cb = KMeansCodebook(centroids=jnp.ones((3, 2), jnp.bfloat16))
    path = tmp_path / "bf16.vq"
    vqlib.save(path, cb)
    with safetensors.safe_open(path, "numpy") as f:
        assert set(f.keys()) == {"centroids"}
        raw = f.get_tensor("centroids")
        tree = json.loads(f.metadata()["tree"])
    assert raw.dtype == np.uint16
    assert tree["data"]["centroids"]["dtype"] == "bfloat16"
    np.testing.assert_array_equal(raw, np.asarray(cb.centroids).view(np.uint16))


# ----------------------------------------------------------------------------- atomic writes


def test_save_over_existing_file_replaces_it(tmp_path, saved):
    other = KMeansCodebook(centroids=jnp.full((2, 5), 7.0, jnp.float32))
    vqlib.save(saved, other)
    _assert_bit_exact(vqlib.load(saved), other)
    assert _temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cb.vq"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, saved, codebook, monkeypatch, failing):
    before = saved.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        vqlib.save(saved, KMeansCodebook(centroids=jnp.zeros((2, 3), jnp.float32)))
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert _temp_files(tmp_path) == []
    _assert_bit_exact(vqlib.load(saved), codebook)


def test_save_gives_the_usual_file_permissions(tmp_path, saved):
    umask = os.umask(0o022)
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_first_write_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError, match="simulated"):
        vqlib.save(tmp_path / "new.vq", KMeansCodebook(centroids=jnp.zeros((2, 3), jnp.float32)))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad files


def test_flipped_tensor_byte_fails_checksum(saved):
    data = bytearray(saved.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    offset = len(data) - 3
    assert offset >= data_start  # inside the tensor data, not the header
    data[offset] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        vqlib.load(saved)


def test_flipped_byte_in_every_tensor_fails_checksum(tmp_path, saved):
    data = saved.read_bytes()
    data_start = 8 + int.from_bytes(data[:8], "little")
    with safetensors.safe_open(saved, "numpy") as f:
        names = list(f.keys())
    header = json.loads(data[8:data_start])
    for name in names:
        begin, _ = header[name]["data_offsets"]
        corrupt = bytearray(data)
        corrupt[data_start + begin] ^= 0x01
        path = tmp_path / f"{name}.vq"
        path.write_bytes(bytes(corrupt))
        with pytest.raises(ValueError, match="checksum"):
            vqlib.load(path)


@pytest.mark.parametrize("keep", [-10, 5], ids=["last-10-bytes-cut", "5-bytes-left"])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="not a readable vqlib file"):
        vqlib.load(saved)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    safetensors.numpy.save_file({"centroids": np.ones((3, 2), np.float32)}, path)
    with pytest.raises(ValueError, match="not a vqlib file"):
        vqlib.load(path)


def test_foreign_safetensors_file_with_other_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    safetensors.numpy.save_file({"w": np.ones((2,), np.float32)}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a vqlib file"):
        vqlib.load(path)


def test_newer_format_version(tmp_path, codebook, monkeypatch):
    path = tmp_path / "future.vq"
    with monkeypatch.context() as m:
        m.setattr(vqlib._io, "FORMAT_VERSION", 999)
        vqlib.save(path, codebook)
    with pytest.raises(ValueError, match="upgrade"):
        vqlib.load(path)


def test_expect_other_type(saved):
    with pytest.raises(ValueError, match="not the expected"):
        vqlib.load(saved, expect=KMeansStats)
    with pytest.raises(ValueError, match="_KeyHolder"):
        vqlib.load(saved, expect=_KeyHolder)


@pytest.mark.parametrize(
    "obj",
    [{"centroids": np.ones((3, 2), np.float32)}, np.ones((3, 2), np.float32), (jnp.ones(2),), None],
    ids=["dict", "ndarray", "tuple", "None"],
)
def test_save_non_vqlib_object(tmp_path, obj):
    path = tmp_path / "bad.vq"
    with pytest.raises(TypeError, match="vqlib codebook or index"):
        vqlib.save(path, obj)
    assert list(tmp_path.iterdir()) == []


def test_random_bytes_file(tmp_path):
    path = tmp_path / "noise.vq"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size=512, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError):
        vqlib.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.vq"
    path.write_bytes(b"")
    with pytest.raises(ValueError):
        vqlib.load(path)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        vqlib.load(tmp_path / "does-not-exist.vq")


# ----------------------------------------------------------------------------- crafted files
# Files with a valid checksum (anyone can recompute a sha256) whose tree vqlib.save cannot have
# written: each must be refused with a ValueError, never a KeyError/TypeError or a wrong object.


def _craft(path, tree, tensors, *, type_name="vqlib.KMeansCodebook", version="1"):
    tree_json = json.dumps(tree, sort_keys=True)
    metadata = {
        "format": "vqlib",
        "format_version": version,
        "type": type_name,
        "tree": tree_json,
        "checksum": vqlib._io._checksum(tree_json, tensors),
    }
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    return path


_CENTROIDS = {"centroids": np.ones((3, 2), np.float32)}
_GOOD = {
    "type": "vqlib.KMeansCodebook",
    "static": {},
    "data": {"centroids": {"tensor": "centroids", "dtype": "float32"}, "stats": {"value": None}},
}


def test_crafted_good_tree_loads(tmp_path):
    cb = vqlib.load(_craft(tmp_path / "ok.vq", _GOOD, _CENTROIDS))
    np.testing.assert_array_equal(cb.centroids, np.ones((3, 2)))


@pytest.mark.parametrize(
    "tree",
    [
        {**_GOOD, "data": {**_GOOD["data"], "centroids": {"tensor": "missing", "dtype": "float32"}}},
        {**_GOOD, "data": {**_GOOD["data"], "extra": {"value": None}}},
        {**_GOOD, "data": {**_GOOD["data"], "centroids": {"value": "abc"}}},
        {**_GOOD, "data": {**_GOOD["data"], "centroids": {"tensor": "centroids", "dtype": "bfloat16"}}},
        {"type": "vqlib.KMeansCodebook", "data": _GOOD["data"]},
        {"list": [_GOOD]},
        "not a node",
    ],
    ids=["missing-tensor", "extra-field", "value-as-array", "dtype-mismatch", "no-static", "list-root", "string"],
)
def test_crafted_malformed_tree_is_refused(tmp_path, tree):
    with pytest.raises(ValueError, match="malformed|header says"):
        vqlib.load(_craft(tmp_path / "bad.vq", tree, _CENTROIDS))


def test_crafted_header_type_must_match_the_tree(tmp_path):
    with pytest.raises(ValueError, match="header says vqlib.KMeansStats"):
        vqlib.load(_craft(tmp_path / "bad.vq", _GOOD, _CENTROIDS, type_name="vqlib.KMeansStats"))


def test_crafted_format_version_must_be_a_number(tmp_path):
    with pytest.raises(ValueError, match="format_version"):
        vqlib.load(_craft(tmp_path / "bad.vq", _GOOD, _CENTROIDS, version="abc"))


def test_format_version_zero_and_non_ascii_digits_are_refused(tmp_path):
    for version in ("0", "-1", "²"):
        path = _craft(tmp_path / "bad.vq", _GOOD, _CENTROIDS, version=version)
        with pytest.raises(ValueError, match="format_version") as info:
            vqlib.load(path)
        assert str(path) in str(info.value)


def test_expect_must_be_a_type(saved):
    with pytest.raises(TypeError, match="expect"):
        vqlib.load(saved, expect="KMeansCodebook")


# ----------------------------------------------------------------------------- HMAC


def test_hmac_round_trip(tmp_path, codebook):
    path = tmp_path / "signed.vq"
    vqlib.save(path, codebook, hmac_key=b"k" * 32)
    _assert_bit_exact(vqlib.load(path, hmac_key=b"k" * 32), codebook)
    _assert_bit_exact(vqlib.load(path, hmac_key="k" * 32), codebook)  # a str key is its UTF-8 bytes
    _assert_bit_exact(vqlib.load(path), codebook)  # the checksum alone still verifies it


def test_hmac_wrong_key_is_refused(tmp_path, codebook):
    path = tmp_path / "signed.vq"
    vqlib.save(path, codebook, hmac_key=b"right key")
    with pytest.raises(ValueError, match="HMAC") as info:
        vqlib.load(path, hmac_key=b"wrong key")
    assert str(path) in str(info.value)


def test_hmac_catches_an_edit_with_a_recomputed_checksum(tmp_path, codebook):
    # what the plain checksum cannot catch: an edited tensor whose sha256 was recomputed
    path = tmp_path / "signed.vq"
    vqlib.save(path, codebook, hmac_key=b"secret")
    with safetensors.safe_open(path, "numpy") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["centroids"] = tensors["centroids"] + np.float32(1.0)
    metadata["checksum"] = vqlib._io._checksum(metadata["tree"], tensors)
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    assert float(vqlib.load(path).centroids[0, 0]) == float(codebook.centroids[0, 0]) + 1  # no key: accepted
    with pytest.raises(ValueError, match="HMAC"):
        vqlib.load(path, hmac_key=b"secret")


def test_hmac_key_given_for_an_unsigned_file(saved):
    with pytest.raises(ValueError, match="no HMAC") as info:
        vqlib.load(saved, hmac_key=b"secret")
    assert str(saved) in str(info.value)


@pytest.mark.parametrize("secret,error", [(b"", ValueError), (123, TypeError), (["k"], TypeError)])
def test_bad_hmac_keys(tmp_path, codebook, secret, error):
    with pytest.raises(error, match="hmac_key"):
        vqlib.save(tmp_path / "x.vq", codebook, hmac_key=secret)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- temp files of killed writers


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp(folder, pid, host=None, tag="abcd1234"):
    path = folder / f".vqlib-{host or vqlib._io._HOST}.{pid}.{tag}.tmp"
    path.write_bytes(b"partial write")
    return path


def test_temp_name_records_host_and_pid(tmp_path, codebook, monkeypatch):
    names = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (names.append(os.path.basename(src)), replace(src, dst)))
    vqlib.save(tmp_path / "cb.vq", codebook)
    assert len(names) == 1 and names[0].startswith(f".vqlib-{vqlib._io._HOST}.{os.getpid()}.")
    assert names[0].endswith(".tmp")


def test_save_removes_temp_files_of_dead_writers(tmp_path, codebook):
    stale = [_temp(tmp_path, _dead_pid(), tag=f"dead{i}") for i in range(2)]
    other_folder = tmp_path / "other"
    other_folder.mkdir()
    elsewhere = _temp(other_folder, _dead_pid())
    vqlib.save(tmp_path / "cb.vq", codebook)
    assert not any(p.exists() for p in stale)
    assert elsewhere.exists()  # only the folder saved into is cleaned
    assert _temp_files(tmp_path) == []


def test_save_keeps_temp_files_of_live_writers(tmp_path, codebook):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = [
            _temp(tmp_path, sleeper.pid),
            _temp(tmp_path, os.getpid()),  # another thread of this process may be writing it
            _temp(tmp_path, _dead_pid(), host="another-host"),  # a pid of another machine: unknown here
            tmp_path / ".vqlib-k2j4x9ab.tmp",  # an older vqlib's name (no pid), written just now
        ]
        live[-1].write_bytes(b"partial")
        old = tmp_path / ".vqlib-zzzz1111.tmp"  # the same, untouched for two hours: stale
        old.write_bytes(b"partial")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        vqlib.save(tmp_path / "cb.vq", codebook)
        assert all(p.exists() for p in live)
        assert not old.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    vqlib.save(tmp_path / "cb.vq", codebook)
    assert not live[0].exists()  # its writer is gone now


def test_killed_but_unreaped_writer_counts_as_dead(tmp_path, codebook):
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while time.time() < deadline:  # exited, not yet waited for: a zombie
            with open(f"/proc/{zombie.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                    break
            time.sleep(0.05)
        stale = _temp(tmp_path, zombie.pid)
        vqlib.save(tmp_path / "cb.vq", codebook)
        assert not stale.exists()
    finally:
        zombie.wait()


def test_numpy_scalars_in_static_fields_are_saved_as_numbers(tmp_path):
    obj = _KeyHolder(key=jax.random.key(0), codebook=KMeansCodebook(centroids=jnp.ones((2, 2))), tag=np.int64(3))
    path = tmp_path / "holder.vq"
    vqlib.save(path, obj)
    with pytest.raises(ValueError, match="static field tag must be str"):  # the annotation says str
        vqlib.load(path)
    with safetensors.safe_open(path, "numpy") as f:
        assert json.loads(f.metadata()["tree"])["static"]["tag"] == {"value": 3}


def test_arrays_in_static_fields_are_refused_at_save(tmp_path):
    obj = _KeyHolder(key=jax.random.key(0), codebook=KMeansCodebook(centroids=jnp.ones((2, 2))), tag=np.ones(2))
    with pytest.raises(TypeError, match="static field tag"):
        vqlib.save(tmp_path / "holder.vq", obj)
    assert list(tmp_path.iterdir()) == []
