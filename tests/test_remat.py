"""Remat policies: they keep values and gradients, and they really lower the compiled backward
pass's temporary memory, for scanned and unrolled stacks (XLA's own memory analysis)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.backends import memory
from attnzoo.models import decoder_lm, remat
from attnzoo.models.positional import PositionConfig
from attnzoo.training import experiment, mesh, schema

POLICIES = ("full", "dots_saveable", "dots_with_no_batch_dims_saveable")

# Small but not tiny, so that activations dominate the temporaries: each layer's attention
# probabilities alone are 8 x 4 x 256 x 256 float32 = 8 MiB.
B, T, V = 8, 256, 256


def _cfg(scan: bool, policy: str) -> decoder_lm.Config:
    return decoder_lm.Config.tiny(vocab_size=V).replace(
        d_model=128,
        d_ff=512,
        n_heads=4,
        n_layers=4,
        position=PositionConfig(kind="learned", max_len=T),
        scan_layers=scan,
        remat_policy=policy,
    )


def _temp_bytes(scan: bool, policy: str) -> int:
    """Temporary bytes of the compiled value_and_grad of a loss, jitted as training jits it."""
    cfg = _cfg(scan, policy)
    graphdef, params = jax.eval_shape(lambda: decoder_lm.init(cfg, jax.random.key(0)))

    def loss(p, tokens):
        return jnp.mean(decoder_lm.apply(graphdef, p, tokens) ** 2)

    step = jax.jit(
        jax.value_and_grad(loss), compiler_options=memory.remat_compiler_options(policy, "cpu")
    )
    compiled = step.lower(params, jax.ShapeDtypeStruct((B, T), jnp.int32)).compile()
    stats = compiled.memory_analysis()
    assert stats is not None, "this backend reports no memory analysis"
    return stats.temp_size_in_bytes


@pytest.fixture(scope="module")
def temp_bytes():
    """{(layout, policy): temp bytes}, compiled once for the module (~1 s per compile)."""
    out = {}
    for layout in ("scanned", "unrolled"):
        for policy in ("none", *POLICIES):
            out[layout, policy] = _temp_bytes(layout == "scanned", policy)
    logging.info("remat temp bytes: %s", out)
    return out


@pytest.mark.parametrize("layout", ["scanned", "unrolled"])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_lowers_temp_memory(temp_bytes, layout, policy):
    none, got = temp_bytes[layout, "none"], temp_bytes[layout, policy]
    # Measured on XLA:CPU (benchmarks/README.md, "Remat"): scanned 226 MB -> 55-113 MB,
    # unrolled 212 MB -> 119-149 MB. 10% is far beyond compile-to-compile noise (none).
    assert got < 0.9 * none, (layout, policy, got, none)


def test_full_remat_keeps_a_fraction_of_the_activations(temp_bytes):
    for layout in ("scanned", "unrolled"):
        assert temp_bytes[layout, "full"] < 0.8 * temp_bytes[layout, "none"], layout
    # a scanned stack keeps only each layer's input: under half
    assert temp_bytes["scanned", "full"] < 0.5 * temp_bytes["scanned", "none"]


def test_train_step_of_an_experiment_gets_the_memory_savings():
    """The jitted train step ``experiment.build`` makes (with its compiler options) of an
    unrolled stack: remat lowers its temporaries, which XLA:CPU's default scheduler undoes."""

    def temp(policy: str) -> int:
        c = schema.get_config()
        c.model = "tiny"
        c.model_overrides.update(d_model=128, n_heads=4, d_ff=512, n_layers=4)
        c.model_overrides.remat_policy = policy
        c.update(batch_size=B, seq_len=T)
        one = mesh.make_mesh(dict(data=1, fsdp=1, tensor=1))
        exp = experiment.build(c, vocab_size=V, mesh=one)
        assert not exp.model_cfg.scan_layers
        batch = {
            k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "weights" else jnp.int32)
            for k in ("inputs", "targets", "weights", "positions", "segment_ids")
        }
        stats = exp.train_step.lower(exp.abstract_state, batch, None).compile().memory_analysis()
        assert stats is not None
        return stats.temp_size_in_bytes

    none, full = temp("none"), temp("full")
    assert full < 0.85 * none, (full, none)


@pytest.fixture(scope="module")
def small():
    cfg = decoder_lm.Config.tiny(vocab_size=64).replace(d_model=32, d_ff=64, n_heads=4)
    _, params = decoder_lm.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    return cfg, params, tokens


@pytest.mark.parametrize("scan", [False, True])
def test_policies_change_neither_values_nor_gradients(small, scan):
    cfg, params, tokens = small
    if scan:
        cfg, _, params = decoder_lm.relayout(cfg, params, scan_layers=True)

    def value_and_grad(policy):
        graphdef, _ = decoder_lm.init(cfg.replace(remat_policy=policy), jax.random.key(0))
        loss = lambda p: jnp.mean(decoder_lm.apply(graphdef, p, tokens) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    want_loss, want_grads = value_and_grad("none")
    for policy in POLICIES:
        got_loss, got_grads = value_and_grad(policy)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_policy_names_and_the_legacy_switch():
    cfg = decoder_lm.Config.tiny()
    assert cfg.effective_remat_policy == "none"
    assert cfg.replace(remat=True).effective_remat_policy == "dots_with_no_batch_dims_saveable"
    assert cfg.replace(remat_policy="full").effective_remat_policy == "full"
    assert cfg.replace(remat=True, remat_policy="dots_saveable").effective_remat_policy == (
        "dots_saveable"
    )
    assert remat.checkpoint_policy("none") is None
    assert remat.checkpoint_policy("full") is jax.checkpoint_policies.nothing_saveable
    with pytest.raises(ValueError, match=r"unknown remat_policy 'dots'.*valid: none, full"):
        cfg.replace(remat_policy="dots")


def test_compiler_options_only_where_needed():
    assert memory.remat_compiler_options("none", "cpu") is None
    assert memory.remat_compiler_options("full", "tpu") is None
    assert memory.remat_compiler_options("full", "cpu") == {
        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
    }


def test_offload_falls_back_on_cpu_with_a_message(caplog, monkeypatch):
    monkeypatch.setattr(memory, "_warned_offload_fallback", False)
    assert not memory.supports_host_offload()  # CPU: "host" memory is the device's memory
    with caplog.at_level(logging.WARNING):
        policy = memory.training_remat_policy("offload")
    assert policy == "dots_with_no_batch_dims_saveable"
    assert memory.training_remat_policy("full") == "full"
    assert "falls back to 'dots_with_no_batch_dims_saveable'" in caplog.text
