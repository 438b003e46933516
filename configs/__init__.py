"""Experiment configs (``get_config()`` files for ``attnzoo-train --config``) and sharding rules.

Installed as ``attnzoo.configs``: ``attnzoo.configs.sharding.RULES["fsdp"]`` is importable from
anywhere, and ``attnzoo-train --config configs/lm_tiny.py`` works from a checkout.
"""
