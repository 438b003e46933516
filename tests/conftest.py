"""Test setup, before jax is imported: 8 fake CPU devices, fast-compile XLA flags, one
compilation cache and one data dir for the whole run; and shared compiled fixtures."""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Compiling dominates the tests' tiny models, so XLA:CPU skips LLVM's optimisation of the
# machine code it emits (test_encoder_decoder.py alone: 141 -> 102 s). Benchmarks and users
# keep the defaults; subprocesses (CLIs, notebooks, multi-host) inherit these flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One on-disk compilation cache: the xdist workers and the subprocesses the CLI, checkpoint,
# multi-host and notebook tests start (they inherit this environment) load the programs that
# another one already compiled, e.g. the resumed run's train step in the SIGKILL test. Only
# compiles over JAX's default second are stored: caching every eager op too (thousands of
# millisecond compiles) cost as much as it saved.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
# Prepared datasets and trained tokenizers, shared the same way (the library's file locks make
# concurrent first preparations safe), instead of the user's ~/attnzoo_data.
os.environ.setdefault("ATTNZOO_DATA_DIR", str(ROOT / ".pytest_cache" / "attnzoo_data"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_lm():
    """(cfg, graphdef, params) of a tiny decoder LM shared across tests."""
    from attnzoo.models import decoder_lm

    cfg = decoder_lm.Config.tiny(vocab_size=64).replace(d_model=32, d_ff=64, n_heads=4)
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    return cfg, graphdef, params
