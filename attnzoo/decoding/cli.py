"""Command lines over a training workdir (each restores its latest checkpoint)::

    attnzoo-generate --workdir runs/lm --prompt "ROMEO:" [--max_new_tokens 200 --sampler top_p
                     --top_p 0.9 --temperature 0.8 --seed 0]
    attnzoo-generate --hf_dir hf/gpt2 --prompt "Hello"   # a Hugging Face dir + tokenizer.json
    attnzoo-translate --workdir runs/mt [--input sentences.txt] > translations.txt
    attnzoo-eval --workdir runs/lm --split validation      # perplexity (LM); + sacreBLEU (MT)
    attnzoo-eval --workdir runs/lm --text_file book.txt    # LM perplexity on any text
    attnzoo-eval --workdir runs/mt --src_file test.en --ref_file test.de   # MT sacreBLEU
    attnzoo-eval --workdir runs/lm --lengths 256,512,1024 [--rope_scaling yarn:factor=4]
    attnzoo-eval --workdir runs/mt --split test --average_last 5   # mean of 5 checkpoints

``attnzoo-eval`` prints one JSON line of metrics. Every option is ``--snake_case`` (as in
``attnzoo-train``) and ``--help`` shows its default. On CPU each command first switches on
``attnzoo.backends.tune_for_platform()`` (``--nocpu_tuning`` opts out); called from Python
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
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import attnzoo.data
from attnzoo import backends, evaluation, length_eval
from attnzoo.data.hf_tokenizer import HFTokenizer
from attnzoo.decoding import sampling
from attnzoo.decoding.generation import generate
from attnzoo.decoding.translate import strip, translate
from attnzoo.models import convert, decoder_lm
from attnzoo.training import averaging, input_pipeline, schema, tasks
from attnzoo.training.checkpoint import Checkpoints, Restored, abstract_params, load_for_inference
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


def _restore_hf(directory: str) -> Restored:
    """A Hugging Face decoder LM directory (``convert.from_pretrained``, torch-free) and its
    ``tokenizer.json`` as a ``Restored`` (no training config: ``config`` is None)."""
    model_cfg, graphdef, params = convert.from_pretrained(directory)
    if not isinstance(model_cfg, decoder_lm.Config):
        raise SystemExit(
            f"error: {directory} holds an encoder-decoder model; attnzoo-generate continues "
            "text with a decoder-only LM (GPT-2, LLaMA)"
        )
    tokenizer = HFTokenizer.load(directory)
    return Restored(None, "lm", model_cfg, graphdef, params, tokenizer, step=0)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default (``ArgumentDefaultsHelpFormatter``), except that
    a required option says ``(required)`` and a help text that explains its default itself
    (it says "default") is left as it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if "default" in text:
            return text
        return super()._get_help_string(action)


def _parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The argument parser of one command, in the shared style: ``--snake_case`` options, each
    with help that shows its default."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=_HelpFormatter
    )


class _BoolFlag(argparse.Action):
    """An absl-style switch, as ``attnzoo-train`` spells them: ``--NAME`` sets it, ``--noNAME``
    clears it (``--no-NAME`` is accepted too, unlisted)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any):
        name = option_strings[0].removeprefix("--")
        super().__init__([f"--{name}", f"--no{name}"], dest, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no"))


def _common(parser: argparse.ArgumentParser, *, workdir_required: bool = True) -> None:
    parser.add_argument(
        "--workdir", required=workdir_required, help="training workdir with checkpoints/"
    )
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the latest readable)"
    )
    parser.add_argument(
        "--cpu_tuning",
        action=_BoolFlag,
        default=None,
        help="on CPU, use attnzoo.backends.cpu: matmul layouts and host allocator; no effect on "
        "accelerators (default: on when run as a program, off when called with an argv list)",
    )
    # the spelling of argparse's BooleanOptionalAction, which earlier versions used
    parser.add_argument(
        "--no-cpu_tuning", dest="cpu_tuning", action="store_false", help=argparse.SUPPRESS
    )


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses ``argv`` (default ``sys.argv``), then tunes for the platform if asked to.

    Run as a program (``argv`` None) the tuning is on unless ``--nocpu_tuning``; called from
    Python it is off unless ``--cpu_tuning``: the caller's process owns its backend. Either way
    it happens before the checkpoint is read, i.e. before this command starts JAX's backend.
    """
    args = parser.parse_args(argv)
    if args.cpu_tuning if args.cpu_tuning is not None else argv is None:
        backends.tune_for_platform()
    return args


def generate_main(argv: Sequence[str] | None = None) -> None:
    """``attnzoo-generate``: continue one or more prompts with a trained decoder LM."""
    p = _parser("attnzoo-generate", generate_main.__doc__)
    _common(p, workdir_required=False)
    p.add_argument(
        "--hf_dir",
        default=None,
        help="instead of --workdir: a Hugging Face directory (config.json, model.safetensors, "
        "tokenizer.json), e.g. from attnzoo-export; GPT-2 or LLaMA (default: none)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="text to continue; repeat for a batch (default: one empty prompt, i.e. BOS)",
    )
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens generated per prompt")
    p.add_argument(
        "--sampler", default="greedy", choices=sampling.SAMPLERS, help="decoding strategy"
    )
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    p.add_argument(
        "--top_k", type=int, default=None, help="--sampler=top_k: keep the k likeliest tokens"
    )
    p.add_argument(
        "--top_p",
        type=float,
        default=None,
        help="--sampler=top_p: keep the smallest set of tokens with this total probability",
    )
    p.add_argument(
        "--min_p",
        type=float,
        default=None,
        help="--sampler=min_p: keep tokens at least this fraction as likely as the likeliest",
    )
    p.add_argument(
        "--repetition_penalty",
        type=float,
        default=1.0,
        help="divide the logits of tokens already in the row by this (1: off)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler")
    args = _parse(p, argv)
    with _one_line_errors(p.prog):
        _generate(args)


def _generate(args: argparse.Namespace) -> None:
    prompts = args.prompt or [""]
    for i, text in enumerate(prompts):
        if _SURROGATE.search(text):  # bytes of the command line that were not UTF-8
            raise ValueError(f"--prompt number {i + 1} is not valid UTF-8")
    if (args.workdir is None) == (args.hf_dir is None):
        raise SystemExit("error: give either --workdir (a training run) or --hf_dir")
    if args.hf_dir is not None:
        r = _restore_hf(args.hf_dir)
    else:
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
    p = _parser("attnzoo-translate", translate_main.__doc__)
    _common(p)
    p.add_argument("--input", default=None, help="text file, one sentence a line (default: stdin)")
    _beam_flags(p)
    _average_flag(p)
    p.add_argument(
        "--on_invalid_utf8",
        default="error",
        choices=INVALID_UTF8,
        help="input that is not UTF-8: stop naming the line (error), or replace each bad byte "
        "with U+FFFD and count the lines on stderr (replace)",
    )
    args = _parse(p, argv)
    with _one_line_errors(p.prog):
        r = _averaged(_restore(args.workdir, args.step, task="mt"), args)
        options = _beam_options(r, args)  # its memory check before any input is read
        lines = _read_lines(args.input, on_invalid=args.on_invalid_utf8, prog=p.prog)
        for line in _translate(r, lines, options):
            print(line, flush=True)


def _translate(r: Restored, sentences: list[str], options: dict[str, Any]) -> list[str]:
    try:
        return translate(r.graphdef, r.params, r.model_cfg, r.tokenizer, sentences, **options)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _beam_flags(p: argparse.ArgumentParser) -> None:
    """The beam-search options of ``attnzoo-translate`` and ``attnzoo-eval`` (``_beam_options``
    reads them)."""
    p.add_argument("--beam_size", type=int, default=4, help="beam width (1: greedy)")
    p.add_argument("--alpha", type=float, default=0.6, help="GNMT length-penalty exponent")
    p.add_argument(
        "--max_len",
        type=_positive_int,
        default=None,
        help="target tokens at most (default: the training seq_len)",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=16,
        help="sentences translated at once (attnzoo-eval: also sequences per perplexity batch)",
    )
    p.add_argument(
        "--max_source_len",
        type=_positive_int,
        default=None,
        help="source tokens kept per sentence, the rest cut (default: the run's "
        "config.eval_source_len, else its training seq_len)",
    )
    p.add_argument(
        "--max_len_offset",
        type=int,
        default=None,
        help="the paper's output limit, source length + N tokens (section 6.1: 50); "
        "--max_len then caps it (default: the run's config.eval_max_len_offset, else none)",
    )


def _beam_options(r: Restored, args: argparse.Namespace) -> dict[str, Any]:
    """The beam-search keywords of `translate` from the command line and the training config
    (after checking that the decoder's cache fits in memory)."""
    max_src_len = args.max_source_len or r.config.get("eval_source_len") or r.config.seq_len
    offset = args.max_len_offset
    if offset is None:
        offset = r.config.get("eval_max_len_offset")
    if offset is not None and offset < 0:
        raise ValueError(f"--max_len_offset must be >= 0, got {offset}")
    if args.max_len is not None:
        max_len = args.max_len
    else:  # the longest output the offset allows, else the training length
        max_len = r.config.seq_len if offset is None else max_src_len + offset
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
        max_src_len=max_src_len,
        batch_size=args.batch_size,
        max_len_offset=offset,
    )


def _batch_perplexity(
    r: Restored, batches: Iterable[dict[str, np.ndarray]], *, desc: str, max_batches: int | None
) -> dict[str, float]:
    """``evaluation.perplexity`` of the model of ``r`` over ``batches`` (a bar on a terminal)."""

    @jax.jit
    def sums(params, batch):
        logits = tasks.forward(r.task, r.graphdef, params, batch)
        targets, weights = tasks.targets(r.task, batch)
        out = cross_entropy(logits, targets, weights)
        return out["nll"], out["weight"]

    return evaluation.perplexity(
        lambda batch: sums(r.params, {k: jnp.asarray(v) for k, v in batch.items()}),
        tqdm.tqdm(batches, desc=desc, file=sys.stderr, disable=None),  # None: no bar off a tty
        max_batches=max_batches,
    )


def perplexity(
    r: Restored, split: str, *, max_batches: int | None, batch_size: int
) -> dict[str, float]:
    """Token-level perplexity exp(NLL / tokens) of ``split`` through the training pipeline.

    Batches are dicts of [batch_size, seq_len] arrays from ``input_pipeline.batches``; see
    ``attnzoo.evaluation.perplexity`` for the returned keys.
    """
    batches = input_pipeline.batches(
        r.config, split, tokenizer=r.tokenizer, batch_size=batch_size, num_epochs=1
    )
    try:
        return _batch_perplexity(r, batches, desc=f"perplexity ({split})", max_batches=max_batches)
    except ValueError:
        raise SystemExit(f"error: split {split!r} gave no tokens to evaluate") from None


def text_batches(
    tokenizer: attnzoo.data.Tokenizer, text: str, *, seq_len: int, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Decoder-LM batches of one text, as the training pipeline shapes a document.

    The text becomes ``[bos] + tokens + [eos]``, cut into consecutive windows of ``seq_len``
    predictions (``inputs`` = the window, ``targets`` = the next tokens): every token after
    ``bos`` is predicted once, from the tokens before it in its window. Each window is one
    segment (positions from 0); the last window and batch are padded with zero-weight rows.

    Yields:
      Dicts of [batch_size, seq_len] arrays: ``inputs``, ``targets``, ``segment_ids``,
      ``positions`` (int32) and ``weights`` (float32, 1 on real targets).
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], np.int32)
    yield from length_eval.window_batches(
        ids, length=seq_len, rows=batch_size, pad_id=tokenizer.pad_id
    )


def eval_main(argv: Sequence[str] | None = None) -> None:
    """``attnzoo-eval``: perplexity on a held-out split (LM and MT) and sacreBLEU (MT)."""
    p = _parser("attnzoo-eval", eval_main.__doc__)
    _common(p)
    p.add_argument(
        "--split",
        default="validation",
        choices=("validation", "test", "train"),
        help="split of the training dataset to evaluate",
    )
    p.add_argument(
        "--max_batches", type=int, default=None, help="perplexity batches (default: all)"
    )
    p.add_argument(
        "--max_sentences", type=int, default=500, help="MT: sentences of --split for BLEU"
    )
    _beam_flags(p)  # --batch_size also sets the perplexity batches
    p.add_argument(
        "--text_file",
        default=None,
        help="LM: perplexity on this UTF-8 text file instead of --split (tokenized with the "
        "run's tokenizer, cut into windows of the training seq_len; default: none)",
    )
    p.add_argument(
        "--src_file",
        default=None,
        help="MT: BLEU of translating this UTF-8 file's lines, scored against --ref_file's, "
        "instead of --split (default: none)",
    )
    p.add_argument(
        "--ref_file",
        default=None,
        help="MT: reference translations, one per line of --src_file (default: none)",
    )
    p.add_argument(
        "--on_invalid_utf8",
        default="error",
        choices=INVALID_UTF8,
        help="--text_file/--src_file/--ref_file that is not UTF-8: stop naming the line "
        "(error), or replace each bad byte with U+FFFD (replace)",
    )
    _length_flags(p)
    _average_flag(p)
    args = _parse(p, argv)
    with _one_line_errors(p.prog):
        _eval(args)


def _eval(args: argparse.Namespace) -> None:
    files = {"--text_file": args.text_file, "--src_file": args.src_file}
    if args.src_file is not None or args.ref_file is not None:
        files["--ref_file"] = args.ref_file
    if args.text_file is not None and args.src_file is not None:
        raise SystemExit("error: --text_file (LM) and --src_file (MT) exclude each other")
    if (args.src_file is None) != (args.ref_file is None):
        raise SystemExit(
            "error: --src_file and --ref_file go together: source lines and their references"
        )
    r = _averaged(_restore(args.workdir, args.step), args)
    r = _rope_scaled(r, args)
    metrics: dict[str, Any] = {"workdir": args.workdir, "step": int(r.step), "task": r.task}
    if args.average_last:
        metrics["averaged_steps"] = args.averaged_steps
    if args.rope_scaling:
        metrics["rope_scaling"] = args.rope_scaling
    if args.lengths is not None:
        _length_perplexities(r, args, metrics)
        return
    if args.text_file is not None or args.src_file is not None:
        needs = "lm" if args.text_file is not None else "mt"
        flag = "--text_file" if needs == "lm" else "--src_file/--ref_file"
        if r.task != needs:
            other = "--src_file/--ref_file" if needs == "lm" else "--text_file"
            raise SystemExit(
                f"error: {flag} needs a {needs!r} run; {args.workdir} holds a {r.task!r} "
                f"model (use {other}, or --split)"
            )
        metrics.update({k.removeprefix("--"): v for k, v in files.items() if v is not None})
        if needs == "lm":
            metrics.update(_text_file_perplexity(r, args))
        else:
            metrics.update(_file_bleu(r, args))
        print(json.dumps(metrics), flush=True)
        return
    metrics["split"] = args.split
    ppl = perplexity(r, args.split, max_batches=args.max_batches, batch_size=args.batch_size)
    metrics.update(ppl)
    if r.task == "mt":
        pairs = attnzoo.data.text_pairs(
            r.config.dataset, args.split, r.config.data_dir, text_keys=schema.text_keys(r.config)
        )
        metrics.update(_bleu(r, args, pairs[: args.max_sentences]))
    print(json.dumps(metrics), flush=True)


def _bleu(r: Restored, args: argparse.Namespace, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``bleu`` (sacreBLEU of beam-search translations of the pairs' sources against their
    references), its ``bleu_signature`` and the number of ``sentences``."""
    try:
        _, bleu = evaluation.translation_bleu(
            r.graphdef, r.params, r.model_cfg, r.tokenizer, pairs, **_beam_options(r, args)
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return {
        "bleu": round(bleu.score, 2),
        "bleu_signature": evaluation.bleu_signature(),
        "sentences": len(pairs),
    }


def _text_file_perplexity(r: Restored, args: argparse.Namespace) -> dict[str, float]:
    """Perplexity of the model on ``--text_file`` (``text_batches`` of the training seq_len)."""
    lines = _read_lines(args.text_file, on_invalid=args.on_invalid_utf8, prog="attnzoo-eval")
    text = "\n".join(lines)
    if not text.strip():
        raise ValueError(f"--text_file {args.text_file} is empty: give a file with some text")
    batches = text_batches(r.tokenizer, text, seq_len=r.config.seq_len, batch_size=args.batch_size)
    return _batch_perplexity(
        r, batches, desc=f"perplexity ({args.text_file})", max_batches=args.max_batches
    )


def _file_bleu(r: Restored, args: argparse.Namespace) -> dict[str, Any]:
    """BLEU of translating ``--src_file``'s lines against ``--ref_file``'s (line by line)."""
    read = dict(on_invalid=args.on_invalid_utf8, prog="attnzoo-eval")
    sources = _read_lines(args.src_file, **read)
    references = _read_lines(args.ref_file, **read)
    if len(sources) != len(references):
        raise ValueError(
            f"--src_file {args.src_file} has {len(sources)} lines but --ref_file "
            f"{args.ref_file} has {len(references)}: give one reference line per source line"
        )
    if not sources:
        raise ValueError(f"--src_file {args.src_file} is empty: give one sentence per line")
    return _bleu(r, args, list(zip(sources, references, strict=True)))


# -- evaluation lengths, RoPE scaling at inference, checkpoint averaging (issue 22) ----------


def _length_flags(p: argparse.ArgumentParser) -> None:
    """``attnzoo-eval``'s ``--lengths``, ``--rope_scaling`` and ``--max_tokens``."""
    p.add_argument(
        "--lengths",
        type=_lengths_arg,
        default=None,
        help="LM: comma-separated evaluation lengths, e.g. 256,512,1024,2048: perplexity of "
        "--split's token stream cut into windows of each length, one JSON line per length; "
        "lengths past a learned position table give perplexity null and a reason "
        "(default: none, the training pipeline's batches)",
    )
    p.add_argument(
        "--rope_scaling",
        default=None,
        help="RoPE runs: apply a context-extension scaling at inference, KIND:factor=F with "
        "KIND linear, dynamic (NTK), yarn or llama3, e.g. yarn:factor=4; the original length "
        "is the training seq_len unless original_max_len=N is given (default: none)",
    )
    p.add_argument(
        "--max_tokens",
        type=_positive_int,
        default=None,
        help="--lengths: score only the first N tokens of the split, the same ones at every "
        "length (default: all of them)",
    )


def _lengths_arg(text: str) -> list[int]:
    """argparse type of ``--lengths`` (``length_eval.parse_lengths``, its message kept)."""
    try:
        return length_eval.parse_lengths(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _average_flag(p: argparse.ArgumentParser) -> None:
    """``--average_last`` of ``attnzoo-eval`` and ``attnzoo-translate``."""
    p.add_argument(
        "--average_last",
        type=_positive_int,
        default=None,
        help="use the element-wise mean of the params of the last N checkpoints (the paper's "
        "checkpoint averaging: 5 for base, 20 for big) up to --step (default: no averaging, "
        "one checkpoint)",
    )


def _averaged(r: Restored, args: argparse.Namespace) -> Restored:
    """``r`` with its params replaced by the mean of the last ``--average_last`` checkpoints
    (those up to ``--step`` when given); the steps go to ``args.averaged_steps``."""
    args.averaged_steps = None
    n = getattr(args, "average_last", None)
    if not n:
        return r
    ckpt = Checkpoints(args.workdir, read_only=True)
    try:
        older = [s for s in ckpt.steps() if s <= r.step]
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), r.params
        )
        steps = averaging.last_steps(older, n, where=args.workdir)
        params = averaging.average_trees(ckpt.restore_params(abstract, s)[1] for s in steps)
    finally:
        ckpt.close()
    args.averaged_steps = steps
    return dataclasses.replace(r, params=params)


def _rope_scaled(r: Restored, args: argparse.Namespace) -> Restored:
    """``r`` with ``--rope_scaling`` on its model config (and a graphdef built from it)."""
    if not getattr(args, "rope_scaling", None):
        return r
    scaling = length_eval.parse_rope_scaling(args.rope_scaling)
    model_cfg = length_eval.with_rope_scaling(
        r.model_cfg, scaling, original_max_len=r.config.seq_len
    )
    graphdef, _ = abstract_params(r.task, model_cfg)
    return dataclasses.replace(r, model_cfg=model_cfg, graphdef=graphdef)


def _length_perplexities(r: Restored, args: argparse.Namespace, metrics: dict[str, Any]) -> None:
    """``--lengths``: one JSON line per length, the perplexity of ``--split``'s token stream in
    windows of that length (``attnzoo.length_eval``; batches of about ``--batch_size`` x the
    training seq_len tokens)."""
    if r.task != "lm":
        raise SystemExit(
            f"error: --lengths evaluates decoder LMs; {args.workdir} holds a {r.task!r} model "
            "(leave --lengths out)"
        )
    if args.text_file is not None or args.src_file is not None:
        raise SystemExit("error: --lengths reads --split; leave out --text_file/--src_file")
    documents = attnzoo.data.texts(
        r.config.dataset, args.split, r.config.data_dir, text_keys=schema.text_keys(r.config)
    )
    ids = length_eval.token_stream(r.tokenizer, documents)
    results = length_eval.length_perplexity(
        r.model_cfg,
        r.params,
        ids,
        args.lengths,
        pad_id=r.tokenizer.pad_id,
        tokens_per_batch=args.batch_size * r.config.seq_len,
        max_tokens=args.max_tokens,
        graphdef=r.graphdef,
    )
    metrics["split"] = args.split
    metrics["train_seq_len"] = int(r.config.seq_len)
    for length, result in results.items():
        print(json.dumps({**metrics, "length": int(length), **result}), flush=True)
