"""Sharded equals unsharded for both model families: encoder-decoder training under FSDP=8 and
DP=2 x FSDP=2 x TP=2 gives one device's losses; LM ``generate`` and encoder-decoder beam search
with parameters laid out by the rules tables on the 8-device mesh give the same tokens; and a
mesh that cannot split the model's heads fails before anything compiles.

(The decoder-LM training equivalence is in test_sharding.py.)
"""

import jax
import numpy as np
import pytest

from attnzoo.decoding.beam_search import beam_search
from attnzoo.decoding.generation import generate
from attnzoo.models import decoder_lm, encoder_decoder
from attnzoo.training import experiment, mesh, rules, schema, sharding

VOCAB, B, S, T, STEPS = 64, 8, 12, 10, 3
MESHES = {
    "single": (dict(data=1, fsdp=1, tensor=1), "dp"),
    "fsdp8": (dict(data=1, fsdp=8, tensor=1), "fsdp"),
    "dp2_fsdp2_tp2": (dict(data=2, fsdp=2, tensor=2), "fsdp_tp"),
}


def _mt_config(mesh_sizes, strategy):
    c = schema.get_config()
    c.task = "mt"
    c.model = "tiny"
    # no biases: see test_sharding.py (a zero-in-exact-arithmetic gradient Adam would amplify)
    c.model_overrides.update(
        d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=1, use_bias=False
    )
    c.update(
        batch_size=B,
        seq_len=T,
        steps=STEPS,
        warmup_steps=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        sharding=strategy,
    )
    c.mesh.update(mesh_sizes)
    return c


def _mt_batch():
    rng = np.random.default_rng(0)
    tgt = rng.integers(3, VOCAB, (B, T + 1)).astype(np.int32)
    ones = np.ones((B, T), np.int32)
    return dict(
        src=rng.integers(3, VOCAB, (B, S)).astype(np.int32),
        src_segment_ids=np.ones((B, S), np.int32),
        src_positions=np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(),
        tgt_inputs=tgt[:, :-1],
        tgt_targets=tgt[:, 1:],
        tgt_segment_ids=ones,
        tgt_positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        tgt_weights=ones.astype(np.float32),
    )


def _train_mt(name):
    exp = experiment.build(_mt_config(*MESHES[name]), vocab_size=VOCAB)
    state = exp.init_state()
    losses = []
    for _ in range(STEPS):  # the same batch every step: the loss must fall
        batch = sharding.put_batch(_mt_batch(), exp.batch_sharding)
        state, metrics = exp.train_step(state, batch, None)
        losses.append(float(metrics["loss"]))
    return losses


@pytest.fixture(scope="module")
def mt_losses():
    return {name: _train_mt(name) for name in MESHES}


@pytest.mark.parametrize("name", ["fsdp8", "dp2_fsdp2_tp2"])
def test_encoder_decoder_training_equals_one_device(mt_losses, name):
    want = mt_losses["single"]
    np.testing.assert_allclose(mt_losses[name], want, rtol=1e-5)
    assert want[-1] < want[0]  # it trained


def _place(params, strategy, sizes):
    m = mesh.make_mesh(sizes)
    return m, jax.device_put(params, sharding.tree_shardings(params, m, rules.get(strategy)))


def _assert_sharded(params):
    assert any(
        len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
        for x in jax.tree.leaves(params)
    )


@pytest.mark.parametrize("name", ["fsdp8", "dp2_fsdp2_tp2"])
def test_lm_generate_with_sharded_params_gives_the_same_tokens(name):
    cfg = decoder_lm.Config.tiny(vocab_size=VOCAB).replace(d_model=32, d_ff=64, n_heads=4)
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    prompts = np.random.default_rng(1).integers(3, VOCAB, (B, 5)).astype(np.int32)
    want = generate(graphdef, params, cfg, prompts, max_new_tokens=8)
    _, sharded = _place(params, MESHES[name][1], MESHES[name][0])
    _assert_sharded(sharded)
    got = generate(graphdef, sharded, cfg, prompts, max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("name", ["fsdp8", "dp2_fsdp2_tp2"])
def test_beam_search_with_sharded_params_gives_the_same_tokens(name):
    cfg = encoder_decoder.Config.tiny(vocab_size=VOCAB).replace(
        d_model=32, d_ff=64, n_heads=4, n_encoder_layers=1, n_decoder_layers=1
    )
    graphdef, params = encoder_decoder.init(cfg, jax.random.key(0))
    src = np.random.default_rng(2).integers(3, VOCAB, (B, S)).astype(np.int32)
    want = beam_search(graphdef, params, cfg, src, max_len=8, eos_id=2, bos_id=1, beam_size=3)
    _, sharded = _place(params, MESHES[name][1], MESHES[name][0])
    _assert_sharded(sharded)
    got = beam_search(graphdef, sharded, cfg, src, max_len=8, eos_id=2, bos_id=1, beam_size=3)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "overrides, sizes, match",
    [
        # 8-way tensor parallelism of 4 query heads
        (dict(n_heads=4), dict(data=1, fsdp=1, tensor=8), r"n_heads=4 .*'heads'.*mesh.tensor=8"),
        # 4 query heads split 4 ways, but only 2 key/value heads
        (dict(n_heads=4, n_kv_heads=2), dict(data=2, fsdp=1, tensor=4), r"kv_heads=2 .*tensor=4"),
        # an MLP width of 36 split 8 ways
        (dict(n_heads=8, d_ff=36), dict(data=1, fsdp=1, tensor=8), r"d_ff=36 .*'mlp'.*tensor=8"),
    ],
)
def test_mesh_that_cannot_split_the_model_fails_before_compiling(
    overrides, sizes, match, monkeypatch
):
    c = _mt_config(sizes, "fsdp_tp")
    c.model_overrides.update(overrides)

    def no_compiling(*args, **kw):
        raise AssertionError("compiled before the mesh was checked")

    monkeypatch.setattr(jax, "jit", no_compiling)
    with pytest.raises(ValueError, match=match):
        experiment.build(c, vocab_size=VOCAB)


def test_dimensions_the_rules_do_not_split_are_not_checked():
    cfg = encoder_decoder.Config.tiny(VOCAB).replace(d_model=36, n_heads=3, d_ff=36)
    # pure data parallelism on 8 devices: 3 heads and d_ff 36 need no split
    sharding.check_model_axes(cfg, mesh.make_mesh(dict(data=8)), rules.DP)
    # FSDP splits d_model (replicated when it does not divide), not heads or d_ff
    sharding.check_model_axes(cfg, mesh.make_mesh(dict(fsdp=8)), rules.FSDP)
    with pytest.raises(ValueError, match="n_heads=3"):
        sharding.check_model_axes(cfg, mesh.make_mesh(dict(data=4, tensor=2)), rules.FSDP_TP)
