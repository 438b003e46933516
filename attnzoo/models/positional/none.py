"""NoPE: no positional information at all (a causal mask alone still breaks symmetry)."""

from attnzoo.models.positional.base import register

register("none")
