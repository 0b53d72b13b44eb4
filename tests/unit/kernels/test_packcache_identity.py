"""The GGUF's identity as the pack cache keys it (gguf.file.FileIdentity, identity_of,
PackCache.for_model) and the cache's settings (packcache.configure: the flags and the daemon's
settings write what the environment variables say)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from edgebox.gguf.file import GGUFFile, identity_of
from edgebox.kernels import packcache
from tests.fixtures.paths import DATA

MODEL = DATA / "models" / "tiny-deepseek-coder-Q4_0.gguf"
SPLIT = b"chips=1"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBOX_CACHE_DIR", str(tmp_path / "cache"))
    for name in (packcache.ENABLED_ENV, packcache.MAX_GIB_ENV):
        monkeypatch.setenv(name, "")  # (so that what configure() writes is undone after the test)
        monkeypatch.delenv(name)
    monkeypatch.setattr(packcache, "_warned", set())
    return tmp_path


def views(f: GGUFFile) -> list[np.ndarray]:
    return [t.data for t in f.tensors.values() if t.data.size]


def key_of(path) -> bytes:
    c = packcache.PackCache.for_model(views(GGUFFile(path)), SPLIT)
    return c.key


def test_every_tensor_view_leads_to_its_files_identity(env):
    f = GGUFFile(MODEL)
    ident = f.identity
    st = MODEL.stat()
    assert (ident.path, ident.size, ident.mtime_ns) == (str(MODEL.resolve()), st.st_size, st.st_mtime_ns)
    assert len(ident.header_sha256) == 64
    t = next(iter(f.tensors.values()))
    assert identity_of(t.data) == ident and identity_of(t.data[1:3, 4:]) == ident  # a shard of a tensor too
    assert identity_of(np.zeros(4, np.uint8)) is None and identity_of(t.data.copy()) is None


def test_for_model_keys_by_the_identity_and_refuses_mixed_or_foreign_views(env):
    f = GGUFFile(MODEL)
    c = packcache.PackCache.for_model(views(f), SPLIT)
    assert c.key == packcache.entry_key(f.identity, SPLIT) and c.status == "miss"
    assert packcache.PackCache.for_model(views(f), b"chips=4").key != c.key
    other = GGUFFile(DATA / "models" / "tiny-deepseek-coder-Q8_0.gguf")
    assert packcache.PackCache.for_model([*views(f), *views(other)], SPLIT) is None  # two files: no one key
    assert packcache.PackCache.for_model([*views(f), np.zeros(8, np.uint8)], SPLIT) is None


def test_a_changed_file_gets_a_new_key_even_with_its_old_size_and_mtime(env):
    path = env / "m.gguf"
    shutil.copyfile(MODEL, path)
    before = key_of(path)
    st = path.stat()
    data = path.read_bytes()
    name = GGUFFile(path).fields["general.name"].encode()
    at = data.index(name, 0, GGUFFile(path).data_offset)
    changed = data[:at] + name[:1].swapcase() + data[at + 1 :]  # the header changed; the size stays
    assert changed != data and len(changed) == len(data)
    path.write_bytes(changed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and so does the mtime
    assert GGUFFile(path).identity.mtime_ns == st.st_mtime_ns
    assert key_of(path) != before  # the header's hash tells them apart


def test_the_same_bytes_rewritten_get_a_new_key(env):
    path = env / "m.gguf"
    shutil.copyfile(MODEL, path)
    before = key_of(path)
    assert key_of(path) == before  # nothing changed: the same key
    st = path.stat()
    path.write_bytes(path.read_bytes())  # the same content, written again
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert key_of(path) != before  # the mtime is part of the identity
    moved = env / "moved.gguf"
    os.rename(path, moved)
    assert key_of(moved) == key_of(moved)  # (a rename keeps size, mtime and header: see test_pack_cache)


def test_configure_writes_what_the_environment_variables_say(env, monkeypatch):
    assert packcache.enabled() and packcache.max_bytes() == int(packcache.DEFAULT_MAX_GIB * 2**30)
    packcache.configure(enabled=False)
    assert os.environ[packcache.ENABLED_ENV] == "0" and not packcache.enabled()
    packcache.configure(max_gib=2.5)
    assert packcache.max_bytes() == int(2.5 * 2**30) and not packcache.enabled()  # None left it off
    packcache.configure(enabled=True)
    assert packcache.enabled() and packcache.max_bytes() == int(2.5 * 2**30)
    monkeypatch.setenv(packcache.ENABLED_ENV, "off")
    assert not packcache.enabled()
    assert packcache.PackCache.for_model(views(GGUFFile(MODEL)), SPLIT) is None


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "8"])
def test_a_bad_size_is_refused_naming_the_setting(env, bad):
    with pytest.raises(ValueError, match=r"^--weight-cache-gib must be a positive number of GiB"):
        packcache.configure(max_gib=bad, gib_name="--weight-cache-gib")
    assert packcache.MAX_GIB_ENV not in os.environ


def test_a_bad_size_in_the_environment_warns_once_and_uses_the_default(env, monkeypatch, capsys):
    monkeypatch.setenv(packcache.MAX_GIB_ENV, "lots")
    assert packcache.max_bytes() == packcache.max_bytes() == int(packcache.DEFAULT_MAX_GIB * 2**30)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "EDGEBOX_WEIGHT_CACHE_GIB='lots' is not a positive number of GiB" in err


def test_the_daemons_settings_write_the_environment_and_a_bad_size_is_one_config_error(env, tmp_path):
    from edgebox.daemon.config import ConfigError
    from edgebox.daemon.service import Service

    flags = {"broker": "none", "http": "127.0.0.1:0", "fw_root": tmp_path / "fw"}
    Service(None, flags, env={})  # settings left unset: the environment stays as it was
    assert packcache.ENABLED_ENV not in os.environ and packcache.MAX_GIB_ENV not in os.environ
    Service(None, {**flags, "weight_cache": False, "weight_cache_gib": 3.0}, env={})
    assert not packcache.enabled() and packcache.max_bytes() == 3 * 2**30
    config = tmp_path / "edgebox.toml"
    config.write_text("[model]\nweight_cache_gib = 0\n")
    with pytest.raises(ConfigError, match="weight_cache_gib"):
        Service(config, flags, env={})
