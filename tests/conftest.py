"""Test setup: 8 fake CPU devices (set before jax is imported) and shared compiled fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep compile times down on 2 cores; correctness does not depend on these.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
