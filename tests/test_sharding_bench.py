"""``python -m benchmarks.sharding``: what each strategy compiles to on 8 devices.

One benchmark run (a subprocess, so that XLA's C++ log is its stderr) compiles the train step
of both model families under every strategy, plus ``grad_accum_steps=4`` on data=8; the tests
read its JSON lines: no involuntary rematerialization, FSDP stores an eighth per device,
accumulation adds no collective and no work, FSDP x TP splits the weights over ``tensor``.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attnzoo.models import activation_sharding as act
from attnzoo.training import mesh as mesh_lib
from attnzoo.training import rules, steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
INVOLUNTARY = "Involuntary full rematerialization"


def _bench(*args: str) -> tuple[list[dict], str, str]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"  # conftest silences XLA's warnings; they are the point
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.sharding", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    records = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return records, p.stdout, p.stderr


@pytest.fixture(scope="module")
def bench_modules():
    """(``benchmarks.sharding``, ``benchmarks.run``): run from the repository root, not
    installed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        import benchmarks.run
        import benchmarks.sharding

        yield benchmarks.sharding, benchmarks.run


@pytest.fixture(scope="module")
def default_run():
    return _bench()


def _record(records, task, strategy, accum=1):
    (r,) = [
        r
        for r in records
        if (r["task"], r["strategy"], r["grad_accum_steps"]) == (task, strategy, accum)
    ]
    return r


def test_every_strategy_and_family_compiles_without_involuntary_remat(default_run):
    records, stdout, stderr = default_run
    assert {(r["task"], r["strategy"]) for r in records} == {
        (t, s) for t in ("lm", "mt") for s in ("dp", "fsdp", "fsdp_tp", "tp")
    }
    assert INVOLUNTARY not in stderr
    assert not [(r["task"], r["strategy"]) for r in records if r["involuntary_remat"]]
    # the markdown table: one row per compile
    assert stdout.count("\n| lm |") + stdout.count("\n| mt |") == len(records)


def test_fsdp_tp_with_adafactor_unfused_loss_learned_positions_has_no_involuntary_remat():
    # what the issue reported (AdamW and Adafactor, fused loss on or off), with GPT-2's
    # learned position table: a second lookup into a table split along the model width
    records, _, stderr = _bench(
        "--strategies", "fsdp_tp", "--optimizer", "adafactor", "--no-fused-loss",
        "--position", "learned", "--grad-accum", "1",
    )  # fmt: skip
    assert [
        (r["task"], r["optimizer"], r["fused_loss"], r["model"]["position"]) for r in records
    ] == [
        ("lm", "adafactor", False, "learned"),
        ("mt", "adafactor", False, "learned"),
    ]
    assert INVOLUNTARY not in stderr
    assert not any(r["involuntary_remat"] for r in records)


@pytest.mark.parametrize("task", ["lm", "mt"])
def test_fsdp8_stores_an_eighth_of_the_state_per_device(default_run, task):
    records, _, _ = default_run
    single = _record(records, task, "dp")  # data parallel: every device holds it all
    assert single["state_bytes"] == single["state_bytes_total"]
    fsdp = _record(records, task, "fsdp")
    assert fsdp["state_bytes"] <= 1.1 * single["state_bytes"] / 8, (
        fsdp["state_bytes"] / single["state_bytes"]
    )
    assert fsdp["argument_bytes"] < single["argument_bytes"] / 4


@pytest.mark.parametrize("task", ["lm", "mt"])
def test_gradient_accumulation_adds_no_collective_and_no_work(default_run, task):
    records, _, _ = default_run
    one, four = _record(records, task, "dp", 1), _record(records, task, "dp", 4)
    kinds = lambda r: {k for k, c in r["collectives"].items() if c["count"]}  # noqa: E731
    assert kinds(four) <= kinds(one), (kinds(four), kinds(one))
    assert four["collectives"]["all-gather"]["count"] == 0
    assert abs(four["dot_flops"] / one["dot_flops"] - 1) <= 0.05, (
        four["dot_flops"],
        one["dot_flops"],
    )


@pytest.mark.parametrize("task", ["lm", "mt"])
@pytest.mark.parametrize("strategy", ["fsdp_tp", "tp"])
def test_mlp_and_attention_weights_are_split_over_tensor(default_run, task, strategy):
    records, _, _ = default_run
    specs = _record(records, task, strategy)["param_specs"]
    # which dimension holds the heads / hidden units: (in, heads, head_dim), (heads, head_dim,
    # out), (in, hidden), (hidden, out)
    tensor_dim = {"q": 1, "k": 1, "v": 1, "o": 0, "wi": 1, "wo": 0}
    checked = 0
    for path, spec in specs.items():
        parts = path.split("/")
        if parts[-2] == "kernel" and parts[-3] in tensor_dim:
            assert spec[tensor_dim[parts[-3]]] == "tensor", (path, spec)
            checked += 1
    # lm: 2 blocks of q, k, v, o, wi, wo; mt: 2 encoder blocks, 2 decoder blocks with a
    # second (cross-)attention
    assert checked == (2 * 6 if task == "lm" else 2 * 6 + 2 * 10)


def test_analyze_hlo_counts_loops_and_collectives(bench_modules):
    bench, _ = bench_modules
    m = mesh_lib.make_mesh(dict(data=8, fsdp=1, tensor=1))

    def f(x, w):
        y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=4)
        return y.sum()  # rows split over "data": an all-reduce

    x = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=NamedSharding(m, P("data")))
    w = jax.ShapeDtypeStruct((32, 32), jnp.float32, sharding=NamedSharding(m, P()))
    out = bench.analyze_hlo(jax.jit(f).lower(x, w).compile().as_text())
    assert out["dot_flops"] == 4 * 2 * (16 // 8) * 32 * 32  # per device, every iteration
    assert out["collectives"]["all-reduce"]["count"] >= 1
    assert out["collectives"]["all-gather"]["count"] == 0


def test_constraints_are_no_ops_without_a_mesh():
    x = jnp.ones((4, 3, 8))
    assert act.constrain(x, ("batch", "length", "embed")) is x
    with steps.activation_sharding(None, None):
        assert not act.active()
        assert act.constrain(x, ("batch", "length", "embed")) is x
    m = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
    with steps.activation_sharding(m, rules.FSDP_TP):
        assert act.active()
        y = jax.jit(lambda a: act.constrain(a, ("batch", "length", "mlp")))(x)
        # batch over data x fsdp, the hidden units over tensor
        assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
        with pytest.raises(ValueError, match="needs 3 names"):
            act.constrain(x, ("batch", "length"))
    assert not act.active()
    np.testing.assert_array_equal(y, x)


def test_results_sections_survive_a_rewrite(bench_modules):
    bench, bench_run = bench_modules
    old = "# Results\n\nold table\n\n## Fault soak\n\nsoak\n\n## Sharding\n\nold\n"
    new = bench.replace_section(old, "## Sharding\n\nnew\n")
    assert new == "# Results\n\nold table\n\n## Fault soak\n\nsoak\n\n## Sharding\n\nnew\n"
    middle = bench.replace_section(
        "# R\n\n## Sharding\n\nold\n\n## Fault soak\n\nsoak\n", "## Sharding\n\nnew\n"
    )
    assert middle == "# R\n\n## Sharding\n\nnew\n\n## Fault soak\n\nsoak\n"
    assert bench.replace_section("", "## Sharding\n\nx\n") == "## Sharding\n\nx\n"
    # `make bench` (benchmarks.run) rewrites its table and keeps every "## " section
    assert bench_run.kept_sections(old) == "\n## Fault soak\n\nsoak\n\n## Sharding\n\nold\n"
    assert bench_run.kept_sections("# Benchmark results\n\ntable\n") == ""
    marked = "# R\n\n| t |\n\n<!-- positions:begin -->\n## P\n<!-- positions:end -->\n"
    assert (
        bench_run.kept_sections(marked)
        == "\n<!-- positions:begin -->\n## P\n<!-- positions:end -->\n"
    )
