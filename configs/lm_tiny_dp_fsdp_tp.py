"""``lm_tiny`` on 8 devices as DP x FSDP x TP: mesh data=2, fsdp=2, tensor=2, ``fsdp_tp`` rules.

Batches split over data x fsdp (4 ways), every weight matrix along its model width over fsdp,
attention heads, MLP hidden units and the vocabulary over tensor (``attnzoo.training.rules``);
activations follow the same table (``attnzoo.models.activation_sharding``). On one CPU, ask
XLA for 8 devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        attnzoo-train --config attnzoo:lm_tiny_dp_fsdp_tp --workdir runs/lm_3d

``python -m benchmarks.sharding`` shows what each strategy compiles to (memory, collectives).
"""

from attnzoo.training import schema


def get_config():
    c: schema.Config = schema.load_experiment("lm_tiny")
    c.mesh.update(data=2, fsdp=2, tensor=2)
    c.sharding = "fsdp_tp"
    return c
