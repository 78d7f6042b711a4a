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


ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx fma avx2 avx512f avx512dq avx512_bf16 avx512_vnni

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 99
model\t\t: 99
model name\t: another CPU
flags\t\t: fpu
"""


def test_cpu_names_model_family_and_vector_isa():
    cpu = hostenv.cpu(ZEN5)
    assert cpu == {"name": "AMD EPYC (family 26, model 2; avx2 fma avx512f avx512_bf16 avx512_vnni)",
                   "model_name": "AMD EPYC", "family": 26, "model": 2,
                   "isa": ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"]}


def test_cpu_without_family_or_vector_flags():
    cpu = hostenv.cpu("model name\t: Some CPU\nflags\t: fpu sse2\n")
    assert cpu["name"] == "Some CPU" and cpu["family"] is None and cpu["isa"] == []
    assert hostenv.cpu("")["name"]  # no /proc/cpuinfo: what platform knows, never empty


def test_cpu_reads_this_machine():
    assert hostenv.cpu()["name"]
