"""Command lines over a training workdir (each restores its latest checkpoint)::

    attnzoo-generate --workdir runs/lm --prompt "ROMEO:" [--max_new_tokens 200 --sampler top_p
                     --top_p 0.9 --temperature 0.8 --seed 0]
    attnzoo-translate --workdir runs/mt [--input sentences.txt] > translations.txt
    attnzoo-eval --workdir runs/lm --split validation      # perplexity (LM); + sacreBLEU (MT)

``attnzoo-eval`` prints one JSON line of metrics. On CPU each command first switches on
``attnzoo.backends.tune_for_platform()`` (``--no-cpu_tuning`` opts out); called from Python
with an ``argv`` list, it leaves the calling process alone unless ``--cpu_tuning`` is passed.

Errors end a command with one line, ``attnzoo-<command>: error: ...`` (exit status 1), never a
traceback: bad options, unreadable or unwritable files, input that is not UTF-8 (line and
file named; ``attnzoo-translate --on_invalid_utf8=replace`` replaces it instead), and a KV
cache that cannot fit in memory (checked before anything is allocated; see
``_check_cache_memory``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
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
from attnzoo.training import input_pipeline, schema, tasks
from attnzoo.training.checkpoint import Restored, load_for_inference
from attnzoo.training.losses import cross_entropy

__all__ = ["eval_main", "generate_main", "perplexity", "strip", "translate_main"]

INVALID_UTF8 = ("error", "replace")  # --on_invalid_utf8 choices
# lone surrogates: what the bytes of invalid UTF-8 decode to with errors="surrogateescape"
_SURROGATE = re.compile("[\ud800-\udfff]")


@contextlib.contextmanager
def _one_line_errors(prog: str) -> Iterator[None]:
    """Turns the errors a command can meet into ``PROG: error: ...`` and exit status 1.

    ``SystemExit("error: ...")`` raised inside gets the program name; ValueError (including
    Unicode errors), OSError, KeyError, ZeroDivisionError and an XLA out-of-memory error
    become one line (``schema.describe_error``). argparse's own exits pass through unchanged.
    """
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str) and e.code.startswith("error: "):
            raise SystemExit(f"{prog}: {e.code}") from None
        raise
    except (ValueError, OSError, KeyError, ZeroDivisionError) as e:
        raise SystemExit(f"{prog}: error: {schema.describe_error(e)}") from None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).strip().splitlines()[0]
        raise SystemExit(
            f"{prog}: error: out of memory ({first}); lower the batch or the lengths"
        ) from None


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be >= 1, got {value} (leave it out for the default)"
        )
    return value


def _read_lines(path: str | None, *, on_invalid: str = "error", prog: str = "") -> list[str]:
    """The lines of ``path`` (``None``: stdin), decoded as UTF-8.

    Invalid UTF-8 is a ValueError naming the file (``<stdin>``), the line and the byte; with
    ``on_invalid="replace"`` each invalid byte becomes U+FFFD and the lines affected are
    counted on stderr (``prog: warning: ...``).
    """
    name = "<stdin>" if path is None else path
    if path is not None:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="surrogateescape")
    elif hasattr(sys.stdin, "buffer"):
        text = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    else:  # a text stream put in place of stdin (tests, notebooks)
        text = sys.stdin.read()
    lines = text.splitlines()
    bad = [i for i, line in enumerate(lines) if _SURROGATE.search(line)]
    if not bad:
        return lines
    if on_invalid == "error":
        line = lines[bad[0]]
        match = _SURROGATE.search(line)
        assert match is not None
        code = ord(match.group())
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise ValueError(
            f"{name}: line {bad[0] + 1} is not valid UTF-8 ({byte} at character "
            f"{match.start() + 1}); fix the input or pass --on_invalid_utf8=replace"
        )
    for i in bad:
        lines[i] = _SURROGATE.sub("\ufffd", lines[i])
    print(
        f"{prog}: warning: {name}: replaced invalid UTF-8 with U+FFFD in {len(bad)} line(s) "
        f"(first: line {bad[0] + 1})",
        file=sys.stderr,
    )
    return lines


def _check_cache_memory(
    model_cfg: Any, *, rows: int, slots: int, what: str, fix: str, extra: int = 0
) -> None:
    """Fails before decoding when its KV cache alone cannot fit on the default device.

    The estimate, a lower bound: keys and values of every cached layer, ``2 x layers x rows x
    slots x kv_heads x head_size x itemsize(dtype)``, plus ``extra`` bytes (the output
    tokens). ``schema.memory_limit`` of ``jax.devices()[0]`` is the limit (host RAM on CPU);
    ``$ATTNZOO_SKIP_MEMORY_CHECK`` skips the check.
    """
    if os.environ.get(schema.SKIP_MEMORY_CHECK_ENV, "") not in ("", "0"):
        return
    limit = schema.memory_limit(jax.devices()[:1])
    if limit is None:
        return
    layers = getattr(model_cfg, model_cfg.STACKS[model_cfg.CACHED_STACK])
    itemsize = jnp.dtype(model_cfg.dtype).itemsize
    cache = 2 * layers * rows * slots * model_cfg.kv_heads * model_cfg.head_size * itemsize
    if cache + extra <= limit[0]:
        return
    raise ValueError(
        f"{what} needs a KV cache of {schema.gib(cache)} (2 x {layers} layers x {rows} rows x "
        f"{slots} slots x {model_cfg.kv_heads} heads x {model_cfg.head_size} dims x {itemsize} "
        f"bytes), more than the {schema.gib(limit[0])} {limit[1]}: {fix}"
    )


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
    with _one_line_errors(p.prog):
        _generate(args)


def _generate(args: argparse.Namespace) -> None:
    prompts = args.prompt or [""]
    for i, text in enumerate(prompts):
        if _SURROGATE.search(text):  # bytes of the command line that were not UTF-8
            raise ValueError(f"--prompt number {i + 1} is not valid UTF-8")
    r = _restore(args.workdir, args.step, task="lm")
    tok = r.tokenizer
    # training documents start with bos, so an empty prompt is still a valid context
    ids = [[tok.bos_id, *tok.encode(text)] for text in prompts]
    if args.max_new_tokens >= 1:  # generate() itself reports smaller values
        longest = max(len(row) for row in ids)
        _check_cache_memory(
            r.model_cfg,
            rows=len(ids),
            slots=longest + args.max_new_tokens,
            what=f"a prompt of {longest} tokens + --max_new_tokens {args.max_new_tokens}",
            fix="lower --max_new_tokens",
            extra=len(ids) * args.max_new_tokens * 4,
        )
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
    p.add_argument(
        "--max_len",
        type=_positive_int,
        default=None,
        help="target tokens at most (default: the training seq_len)",
    )
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument(
        "--on_invalid_utf8",
        default="error",
        choices=INVALID_UTF8,
        help="input that is not UTF-8: stop naming the line (error), or replace each bad byte "
        "with U+FFFD and count the lines on stderr (replace)",
    )
    args = _parse(p, argv)
    with _one_line_errors(p.prog):
        r = _restore(args.workdir, args.step, task="mt")
        options = _beam_options(r, args)  # its memory check before any input is read
        lines = _read_lines(args.input, on_invalid=args.on_invalid_utf8, prog=p.prog)
        for line in _translate(r, lines, options):
            print(line, flush=True)


def _translate(r: Restored, sentences: list[str], options: dict[str, Any]) -> list[str]:
    try:
        return translate(r.graphdef, r.params, r.model_cfg, r.tokenizer, sentences, **options)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _beam_options(r: Restored, args: argparse.Namespace) -> dict[str, Any]:
    """The beam-search keywords of `translate` from the command line and the training config
    (after checking that the decoder's cache fits in memory)."""
    max_len = r.config.seq_len if args.max_len is None else args.max_len
    if args.beam_size >= 1 and args.batch_size >= 1:  # beam_search reports smaller values
        rows = args.batch_size * args.beam_size
        _check_cache_memory(
            r.model_cfg,
            rows=rows,
            slots=max_len,
            what=f"--max_len {max_len} x --batch_size {args.batch_size} x --beam_size "
            f"{args.beam_size}",
            fix="lower --max_len, --batch_size or --beam_size",
            extra=3 * rows * max_len * 4,  # live candidates and finished hypotheses
        )
    return dict(
        beam_size=args.beam_size,
        alpha=args.alpha,
        max_len=max_len,
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
    p.add_argument(
        "--max_len", type=_positive_int, default=None, help="MT: default the training seq_len"
    )
    args = _parse(p, argv)
    with _one_line_errors(p.prog):
        _eval(args)


def _eval(args: argparse.Namespace) -> None:
    r = _restore(args.workdir, args.step)
    metrics = {"workdir": args.workdir, "step": int(r.step), "task": r.task, "split": args.split}
    ppl = perplexity(r, args.split, max_batches=args.max_batches, batch_size=args.batch_size)
    metrics.update(ppl)
    if r.task == "mt":
        pairs = attnzoo.data.text_pairs(
            r.config.dataset, args.split, r.config.data_dir, text_keys=schema.text_keys(r.config)
        )
        pairs = pairs[: args.max_sentences]
        try:
            _, bleu = evaluation.translation_bleu(
                r.graphdef, r.params, r.model_cfg, r.tokenizer, pairs, **_beam_options(r, args)
            )
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        metrics.update(bleu=round(bleu.score, 2), bleu_signature=str(bleu), sentences=len(pairs))
    print(json.dumps(metrics), flush=True)
