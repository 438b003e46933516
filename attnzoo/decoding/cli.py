"""Command lines over a training workdir (each restores its latest checkpoint)::

    attnzoo-generate --workdir runs/lm --prompt "ROMEO:" [--max_new_tokens 200 --sampler top_p
                     --top_p 0.9 --temperature 0.8 --seed 0]
    attnzoo-translate --workdir runs/mt [--input sentences.txt] > translations.txt
    attnzoo-eval --workdir runs/lm --split validation      # perplexity (LM); + sacreBLEU (MT)

``attnzoo-eval`` prints one JSON line of metrics. On CPU each command first switches on
``attnzoo.backends.tune_for_platform()`` (``--no-cpu_tuning`` opts out); called from Python
with an ``argv`` list, it leaves the calling process alone unless ``--cpu_tuning`` is passed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import attnzoo.data
from attnzoo import backends, evaluation
from attnzoo.decoding import sampling
from attnzoo.decoding.generation import generate
from attnzoo.decoding.translate import strip, translate
from attnzoo.training import input_pipeline, tasks
from attnzoo.training.checkpoint import Restored, load_for_inference
from attnzoo.training.losses import cross_entropy

__all__ = ["eval_main", "generate_main", "perplexity", "strip", "translate_main"]


def _restore(workdir: str, step: int | None, task: str | None = None) -> Restored:
    try:
        restored = load_for_inference(workdir, step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if task is not None and restored.task != task:
        raise SystemExit(
            f"error: {workdir} holds a {restored.task!r} model; this command needs a {task!r} "
            f"one ({'attnzoo-generate' if restored.task == 'lm' else 'attnzoo-translate'} fits)"
        )
    return restored


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="training workdir with checkpoints/")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument(
        "--cpu_tuning",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on CPU, use attnzoo.backends.cpu: matmul layouts and host allocator; no effect on "
        "accelerators (default: on when run as a program, off when called with an argv list)",
    )


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses ``argv`` (default ``sys.argv``), then tunes for the platform if asked to.

    Run as a program (``argv`` None) the tuning is on unless ``--no-cpu_tuning``; called from
    Python it is off unless ``--cpu_tuning``: the caller's process owns its backend. Either way
    it happens before the checkpoint is read, i.e. before this command starts JAX's backend.
    """
    args = parser.parse_args(argv)
    if args.cpu_tuning if args.cpu_tuning is not None else argv is None:
        backends.tune_for_platform()
    return args


def generate_main(argv: Sequence[str] | None = None) -> None:
    """``attnzoo-generate``: continue one or more prompts with a trained decoder LM."""
    p = argparse.ArgumentParser(prog="attnzoo-generate", description=generate_main.__doc__)
    _common(p)
    p.add_argument("--prompt", action="append", default=None, help="repeat for a batch")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--sampler", default="greedy", choices=sampling.SAMPLERS)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--min_p", type=float, default=None)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = _parse(p, argv)
    r = _restore(args.workdir, args.step, task="lm")
    tok = r.tokenizer
    prompts = args.prompt or [""]
    # training documents start with bos, so an empty prompt is still a valid context
    ids = [[tok.bos_id, *tok.encode(text)] for text in prompts]
    try:
        new = generate(
            r.graphdef,
            r.params,
            r.model_cfg,
            ids,
            max_new_tokens=args.max_new_tokens,
            sampler=args.sampler,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            stop_tokens=(tok.eos_id,),
            rng=jax.random.key(args.seed),
            pad_id=tok.pad_id,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for text, row in zip(prompts, np.asarray(new), strict=True):
        print(text + tok.decode(strip(row, eos_id=tok.eos_id)), flush=True)


def translate_main(argv: Sequence[str] | None = None) -> None:
    """``attnzoo-translate``: translate lines from --input (or stdin), one per output line."""
    p = argparse.ArgumentParser(prog="attnzoo-translate", description=translate_main.__doc__)
    _common(p)
    p.add_argument("--input", default=None, help="text file, one sentence a line (default stdin)")
    p.add_argument("--beam_size", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6, help="GNMT length-penalty exponent")
    p.add_argument("--max_len", type=int, default=None, help="default: the training seq_len")
    p.add_argument("--batch_size", type=int, default=16)
    args = _parse(p, argv)
    r = _restore(args.workdir, args.step, task="mt")
    if args.input is None:
        lines = sys.stdin.read().splitlines()
    else:
        with open(args.input, encoding="utf-8") as f:
            lines = f.read().splitlines()
    for line in _translate(r, lines, args):
        print(line, flush=True)


def _translate(r: Restored, sentences: list[str], args: argparse.Namespace) -> list[str]:
    try:
        return translate(
            r.graphdef,
            r.params,
            r.model_cfg,
            r.tokenizer,
            sentences,
            **_beam_options(r, args),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _beam_options(r: Restored, args: argparse.Namespace) -> dict[str, Any]:
    """The beam-search keywords of `translate` from the command line and the training config."""
    return dict(
        beam_size=args.beam_size,
        alpha=args.alpha,
        max_len=args.max_len or r.config.seq_len,
        max_src_len=r.config.seq_len,
        batch_size=args.batch_size,
    )


def perplexity(
    r: Restored, split: str, *, max_batches: int | None, batch_size: int
) -> dict[str, float]:
    """Token-level perplexity exp(NLL / tokens) of ``split`` through the training pipeline.

    Batches are dicts of [batch_size, seq_len] arrays from ``input_pipeline.batches``; see
    ``attnzoo.evaluation.perplexity`` for the returned keys.
    """

    @jax.jit
    def sums(params, batch):
        logits = tasks.forward(r.task, r.graphdef, params, batch)
        targets, weights = tasks.targets(r.task, batch)
        out = cross_entropy(logits, targets, weights)
        return out["nll"], out["weight"]

    batches = input_pipeline.batches(
        r.config, split, tokenizer=r.tokenizer, batch_size=batch_size, num_epochs=1
    )
    try:
        return evaluation.perplexity(
            lambda batch: sums(r.params, {k: jnp.asarray(v) for k, v in batch.items()}),
            tqdm.tqdm(batches, desc=f"perplexity ({split})", file=sys.stderr),
            max_batches=max_batches,
        )
    except ValueError:
        raise SystemExit(f"error: split {split!r} gave no tokens to evaluate") from None


def eval_main(argv: Sequence[str] | None = None) -> None:
    """``attnzoo-eval``: perplexity on a held-out split (LM and MT) and sacreBLEU (MT)."""
    p = argparse.ArgumentParser(prog="attnzoo-eval", description=eval_main.__doc__)
    _common(p)
    p.add_argument("--split", default="validation", choices=("validation", "test", "train"))
    p.add_argument("--max_batches", type=int, default=None, help="perplexity batches (all)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_sentences", type=int, default=500, help="MT: sentences for BLEU")
    p.add_argument("--beam_size", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--max_len", type=int, default=None, help="MT: default the training seq_len")
    args = _parse(p, argv)
    r = _restore(args.workdir, args.step)
    metrics = {"workdir": args.workdir, "step": int(r.step), "task": r.task, "split": args.split}
    ppl = perplexity(r, args.split, max_batches=args.max_batches, batch_size=args.batch_size)
    metrics.update(ppl)
    if r.task == "mt":
        pairs = attnzoo.data.text_pairs(r.config.dataset, args.split, r.config.data_dir)
        pairs = pairs[: args.max_sentences]
        try:
            _, bleu = evaluation.translation_bleu(
                r.graphdef, r.params, r.model_cfg, r.tokenizer, pairs, **_beam_options(r, args)
            )
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        metrics.update(bleu=round(bleu.score, 2), bleu_signature=str(bleu), sentences=len(pairs))
    print(json.dumps(metrics), flush=True)
