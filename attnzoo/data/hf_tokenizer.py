"""Hugging Face tokenizer files (``tokenizer.json``), both ways, through the ``tokenizers``
package (``pip install 'attnzoo[hf]'``; no transformers, no torch).

* ``HFTokenizer.load(directory)``: a checkpoint directory's ``tokenizer.json`` behind attnzoo's
  ``Tokenizer`` protocol, so ``attnzoo-generate --hf_dir`` prints text.
* ``save_tokenizer(tokenizer, directory)``: attnzoo's byte tokenizer as an equivalent
  ``tokenizer.json`` (byte-level BPE with no merges: one token per byte, ids offset by the 3
  special ids); a sentencepiece tokenizer as its model file, ``tokenizer.model``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from attnzoo.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer

__all__ = ["HFTokenizer", "byte_tokenizer_json", "save_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # attnzoo's ids 0, 1, 2


def _tokenizers() -> Any:
    try:
        import tokenizers  # noqa: PLC0415  (optional dependency)
    except ImportError:
        raise ValueError(
            "Hugging Face tokenizer files need the tokenizers package: pip install 'attnzoo[hf]'"
        ) from None
    return tokenizers


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


class HFTokenizer:
    """A ``tokenizer.json`` as an attnzoo ``Tokenizer`` (``encode`` adds no special tokens;
    ``decode`` drops them).

    The special ids come from the directory's ``config.json`` (``bos_token_id``, ...), else
    from ``tokenizer_config.json``'s token strings. Without a bos token, eos is used (as GPT-2
    does, ``<|endoftext|>``); without a pad token, eos.
    """

    def __init__(self, tokenizer: Any, *, bos_id: int, eos_id: int, pad_id: int):
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> HFTokenizer:
        """The tokenizer of a checkpoint directory.

        Raises:
          ValueError: no ``tokenizer.json`` (e.g. a sentencepiece ``tokenizer.model`` only), or
            no eos token to end generated text with.
        """
        directory = pathlib.Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            has_spm = (directory / "tokenizer.model").is_file()
            raise ValueError(
                f"{directory} has no tokenizer.json"
                + (
                    " (only a sentencepiece tokenizer.model: convert it with transformers, "
                    "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
                    if has_spm
                    else "; save the model's tokenizer there (tokenizer.save_pretrained(dir))"
                )
            )
        tok = _tokenizers().Tokenizer.from_file(str(path))
        config = _read_json(directory / "config.json")
        tok_config = _read_json(directory / "tokenizer_config.json")

        def special(name: str) -> int | None:
            value = config.get(f"{name}_token_id")
            if isinstance(value, list):  # several eos ids (LLaMA 3): the first
                value = value[0] if value else None
            if isinstance(value, int):
                return value
            token = tok_config.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            return tok.token_to_id(token) if isinstance(token, str) else None

        eos = special("eos")
        if eos is None:
            raise ValueError(
                f"{directory}: neither config.json (eos_token_id) nor tokenizer_config.json "
                "(eos_token) names an end-of-sequence token; add eos_token_id to config.json"
            )
        bos, pad = special("bos"), special("pad")
        return cls(
            tok, bos_id=eos if bos is None else bos, eos_id=eos, pad_id=eos if pad is None else pad
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; special tokens are dropped."""
        return self._tok.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True
        )

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"


def byte_tokenizer_json() -> str:
    """``tokenizer.json`` text of attnzoo's ``ByteTokenizer``: the same ids for every text
    (UTF-8 byte b is id b + 3; ``<pad>``, ``<s>``, ``</s>`` are 0, 1, 2)."""
    t = _tokenizers()
    table = _byte_to_char()  # the characters ByteLevel pre-tokenization maps bytes to
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    vocab.update({table[b]: b + ByteTokenizer.offset for b in range(256)})
    tok = t.Tokenizer(t.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = t.decoders.ByteLevel()
    tok.add_special_tokens(
        [t.AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS]
    )
    return tok.to_str()


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> unicode map (printable bytes map to themselves)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def save_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike[str]) -> list[str]:
    """Writes what Hugging Face needs of an attnzoo tokenizer into ``directory``; returns the
    file names written.

    ``ByteTokenizer``: ``tokenizer.json`` (loadable by ``tokenizers`` and transformers'
    ``AutoTokenizer``) and ``tokenizer_config.json``. ``SentencePieceTokenizer``: its model
    as ``tokenizer.model`` (transformers' sentencepiece tokenizers read it; the ``tokenizers``
    package needs a converted ``tokenizer.json``). Any other tokenizer: nothing.
    """
    directory = pathlib.Path(directory)
    specials = dict(zip(("pad_token", "bos_token", "eos_token"), SPECIAL_TOKENS, strict=True))
    if isinstance(tokenizer, ByteTokenizer):
        (directory / "tokenizer.json").write_text(byte_tokenizer_json())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return ["tokenizer.json", "tokenizer_config.json"]
    if isinstance(tokenizer, SentencePieceTokenizer):
        target = directory / "tokenizer.model"
        if tokenizer.path is not None:
            shutil.copyfile(tokenizer.path, target)
        else:
            target.write_bytes(tokenizer.__getstate__()["model_proto"])
        return ["tokenizer.model"]
    return []
