"""Decoding loops in stages over a growing KV cache.

A decode step is memory-bound: besides the weights it reads every slot of the self-attention
cache, filled or not. Step ``t`` can only have filled the slots up to ``t``, so the token loop
runs as a few ``while_loop``s, each over a cache just long enough for its last step, grown
(``Cache.grow``) between them. Each stage compiles its own loop body, so a few stages get most
of the gain (measurements in ``benchmarks/README.md``).
"""

from __future__ import annotations


def default_stages(n_steps: int) -> int:
    """About one stage per 32 loop steps, at most 4."""
    return max(1, min(4, round(n_steps / 32)))


def stage_ends(start: int, stop: int, stages: int) -> list[int]:
    """Splits loop steps ``start .. stop-1`` into at most ``stages`` near-equal runs.

    Returns each run's end (exclusive), increasing, the last one ``stop``; ``[stop]`` when
    there are no steps.
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1 (1 = one loop over the whole cache), got {stages}")
    n = stop - start
    stages = max(1, min(stages, n))
    return sorted({start + -(-n * (j + 1) // stages) for j in range(stages)})
