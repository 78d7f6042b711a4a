"""JAX's persistent compilation cache: where it lives, and how it is turned off."""

from fermsca import hostenv


def test_default_compilation_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(hostenv.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hostenv.default_compilation_cache() == str(tmp_path / "fermsca" / "jax")
    monkeypatch.setenv(hostenv.CACHE_ENV, "/somewhere/else")
    assert hostenv.default_compilation_cache() == "/somewhere/else"
    for off in ("off", "0", "", "None"):
        monkeypatch.setenv(hostenv.CACHE_ENV, off)
        assert hostenv.default_compilation_cache() is None
    assert hostenv.enable_compilation_cache(None) is None
    assert hostenv.enable_compilation_cache("off") is None
