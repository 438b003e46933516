"""Same seed and data on 1 device, DP=8, FSDP=8 and DP=2 x FSDP=2 x TP=2: same losses and
params; and the params and optimizer state are really laid out as the rules tables say."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from attnzoo.training import experiment, mesh, rules, schema, sharding

VOCAB = 64
STEPS = 3
MESHES = {
    "single": (dict(data=1, fsdp=1, tensor=1), "dp"),
    "dp8": (dict(data=8, fsdp=1, tensor=1), "dp"),
    "fsdp8": (dict(data=1, fsdp=8, tensor=1), "fsdp"),
    "dp2_fsdp2_tp2": (dict(data=2, fsdp=2, tensor=2), "fsdp_tp"),
}


def _config(mesh_sizes, strategy):
    c = schema.get_config()
    c.model = "tiny"
    # No biases: the key bias gets a gradient that is exactly zero in real arithmetic (softmax
    # ignores a per-query constant), so its float32 rounding noise, which depends on the
    # reduction order of each layout, is what Adam would normalise into a full-size update.
    c.model_overrides.update(
        d_model=32, n_heads=4, d_ff=64, n_layers=1, embed_scale=True, use_bias=False
    )
    c.update(
        batch_size=8,
        seq_len=16,
        steps=STEPS,
        warmup_steps=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        sharding=strategy,
    )
    c.mesh.update(mesh_sizes)
    return c


def _batches():
    # The same batch every step, so that the loss must fall.
    tokens = np.random.default_rng(0).integers(3, VOCAB, (8, 17)).astype(np.int32)
    for _ in range(STEPS):
        segment_ids = np.where(np.arange(16) < 10, 1, 2).astype(np.int32)[None].repeat(8, 0)
        yield dict(
            inputs=tokens[:, :-1],
            targets=tokens[:, 1:],
            segment_ids=segment_ids,
            positions=np.concatenate([np.arange(10), np.arange(6)])[None]
            .repeat(8, 0)
            .astype(np.int32),
            weights=np.ones((8, 16), np.float32),
        )


def _run(name):
    exp = experiment.build(_config(*MESHES[name]), vocab_size=VOCAB)
    state = exp.init_state()
    losses = []
    for batch in _batches():
        state, metrics = exp.train_step(state, sharding.put_batch(batch, exp.batch_sharding), None)
        losses.append(float(metrics["loss"]))
    return exp, state, losses


@pytest.fixture(scope="module")
def runs():
    return {name: _run(name) for name in MESHES}


@pytest.mark.parametrize("name", ["dp8", "fsdp8", "dp2_fsdp2_tp2"])
def test_same_losses_and_params_as_one_device(runs, name):
    _, ref_state, ref_losses = runs["single"]
    _, state, losses = runs[name]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]  # it trained
    # Adam divides by sqrt(nu) + eps: a gradient element near eps turns float32 summation-order
    # differences into ~1e-5 parameter differences; a sharding bug moves them by ~lr = 1e-2.
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    assert int(state.step) == STEPS


def _leaf(tree, *path):
    for key in path:
        tree = tree[key]
    return tree[...] if hasattr(tree, "__getitem__") and not hasattr(tree, "shape") else tree


def test_fsdp_tp_layout_follows_the_rules(runs):
    _, state, _ = runs["dp2_fsdp2_tp2"]
    block = state.params["blocks"][0]
    assert block["mlp"]["wi"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
    assert block["mlp"]["wo"]["kernel"][...].sharding.spec == P("tensor", "fsdp")
    assert block["self_attn"]["q"]["kernel"][...].sharding.spec == P("fsdp", "tensor", None)
    assert state.params["embed"]["embedding"][...].sharding.spec == P("tensor", "fsdp")
    assert block["mlp_norm"]["scale"][...].sharding.spec == P(None)
    # Adam's moments inherit the parameters' layout.
    adam = state.opt_state[1][0]
    assert adam.mu["blocks"][0]["mlp"]["wi"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
    assert adam.nu["embed"]["embedding"][...].sharding.spec == P("tensor", "fsdp")


def _device_bytes(tree, device):
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == device
    )


def test_fsdp8_stores_about_an_eighth_per_device(runs):
    _, state, _ = runs["fsdp8"]
    total = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    per_device = [_device_bytes((state.params, state.opt_state), d) for d in jax.devices()]
    assert len(set(per_device)) == 1
    # 1/8 plus the replicated norms and biases (small: ~4% of this tiny model).
    assert total / 8 <= per_device[0] < 0.17 * total, per_device[0] / total
    _, dp_state, _ = runs["dp8"]
    assert _device_bytes(dp_state.params, jax.devices()[0]) == sum(
        x.nbytes for x in jax.tree.leaves(dp_state.params)
    )


def test_batches_are_split_over_data_and_fsdp(runs):
    exp, _, _ = runs["dp2_fsdp2_tp2"]
    assert exp.batch_sharding.spec == P(("data", "fsdp"), None)
    batch = sharding.put_batch(next(_batches()), exp.batch_sharding)
    assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 16)}


def test_indivisible_dimensions_are_replicated():
    m = mesh.make_mesh(dict(data=1, fsdp=8, tensor=1))
    assert sharding.logical_to_mesh(("vocab", "embed"), (259, 64), m, rules.FSDP) == P(None, "fsdp")
    assert sharding.logical_to_mesh(("vocab", "embed"), (259, 60), m, rules.FSDP) == P(None, None)


def test_unknown_logical_axis_is_a_clear_error():
    m = mesh.make_mesh(dict(data=8, fsdp=1, tensor=1))
    with pytest.raises(ValueError, match="no entry in the sharding rules"):
        sharding.logical_to_mesh(("embd",), (64,), m, rules.DP)


@pytest.mark.parametrize(
    "sizes, match",
    [
        (dict(data=16), "needs 16 devices but 8 exist"),
        (dict(data=-1, fsdp=-1), "at most one -1"),
        (dict(data=3, fsdp=-1), "do not divide"),
        (dict(data=2, pipeline=4), "unknown mesh axes"),
    ],
)
def test_impossible_meshes_fail_fast(sizes, match):
    with pytest.raises(ValueError, match=match):
        mesh.make_mesh(sizes)


def test_batch_that_does_not_split_over_the_mesh_fails_fast():
    c = _config(dict(data=8, fsdp=1, tensor=1), "dp")
    c.batch_size = 12
    with pytest.raises(ValueError, match="batch_size 12 must split"):
        experiment.build(c, vocab_size=VOCAB)


def test_mesh_minus_one_takes_the_remaining_devices():
    m = mesh.make_mesh(dict(data=2, fsdp=-1, tensor=2))
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
