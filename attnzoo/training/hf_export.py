"""``attnzoo-export``: a training run as a Hugging Face checkpoint directory::

    attnzoo-export --workdir runs/gpt2 --out hf/gpt2 [--step 2000]

then ``transformers.AutoModelForCausalLM.from_pretrained("hf/gpt2")`` (an ``mt`` run:
``AutoModelForSeq2SeqLM``) computes the same logits, and ``attnzoo-generate --hf_dir hf/gpt2``
or ``attnzoo.models.convert.from_pretrained`` read it back. The directory gets
``config.json``, ``model.safetensors`` and the run's tokenizer: the byte tokenizer as an
equivalent ``tokenizer.json`` (+ ``tokenizer_config.json``), a sentencepiece one as its
``tokenizer.model`` (``attnzoo.data.hf_tokenizer.save_tokenizer``).

Only a model that a Hugging Face family computes exactly is exported: GPT-2 (learned
positions, pre-LayerNorm, tied head), LLaMA (RoPE, RMSNorm, gated MLP), Marian or T5. Any
other run fails with one line naming each setting that has no equivalent (e.g.
``position.kind='sinusoidal' (gpt2 has 'learned')``). Torch is never needed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from attnzoo import backends
from attnzoo.data import hf_tokenizer
from attnzoo.models import convert
from attnzoo.training import checkpoint, schema

__all__ = ["export_main", "export_run"]


def export_run(
    workdir: str | os.PathLike[str], out: str | os.PathLike[str], *, step: int | None = None
) -> dict[str, Any]:
    """Writes the model of ``workdir``'s checkpoint ``step`` (default: the latest readable)
    and its tokenizer into the directory ``out`` in Hugging Face's format.

    Returns:
      ``{"out", "workdir", "step", "family", "files"}``.

    Raises:
      ValueError: the run's model has no Hugging Face equivalent (each setting named), or
        the workdir has no readable checkpoint.
    """
    restored = checkpoint.load_for_inference(workdir, step)
    tok = restored.tokenizer
    try:
        family, _ = convert.hf_config(restored.model_cfg)
    except ValueError as e:
        raise ValueError(
            f"the {restored.task!r} model of {workdir} (step {restored.step}) cannot be "
            f"exported: {e}"
        ) from None
    convert.save_pretrained(
        restored.model_cfg,
        restored.params,
        out,
        family=family,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    files = ["config.json", "model.safetensors", *hf_tokenizer.save_tokenizer(tok, out)]
    return {
        "out": str(out),
        "workdir": str(workdir),
        "step": int(restored.step),
        "family": family,
        "files": files,
    }


def export_main(argv: Sequence[str] | None = None) -> None:
    """``attnzoo-export``: write a training run's model as a Hugging Face directory."""
    p = argparse.ArgumentParser(
        prog="attnzoo-export",
        description=export_main.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workdir", required=True, help="training workdir with checkpoints/")
    p.add_argument("--out", required=True, help="directory to write (created if needed)")
    p.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the latest readable)"
    )
    args = p.parse_args(argv)
    if argv is None:  # run as a program: this process's backend is ours to tune
        backends.tune_for_platform()
    try:
        summary = export_run(args.workdir, args.out, step=args.step)
    except (ValueError, OSError, KeyError) as e:
        raise SystemExit(f"{p.prog}: error: {schema.describe_error(e)}") from None
    print(json.dumps(summary), flush=True)
    if (pathlib.Path(args.out) / "tokenizer.model").exists():
        print(
            f"{p.prog}: note: the sentencepiece tokenizer is saved as tokenizer.model; "
            "attnzoo-generate --hf_dir needs a tokenizer.json (see attnzoo.data.hf_tokenizer)",
            file=sys.stderr,
        )
