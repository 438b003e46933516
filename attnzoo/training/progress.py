"""Training progress on stderr: a tqdm bar on a terminal, plain log lines everywhere else.

A bar redraws itself with carriage returns, which turns a log file or a CI console into one
long line. So when stderr is not a terminal there is no bar; instead, one line every
``config.log_every`` steps::

    step 120/1000: loss 2.3412, lr 1.00e-03, 18342 tokens/s, ETA 0:02:31

stdout is left alone: ``attnzoo-train`` prints only its JSON summary there.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import IO

import tqdm


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_eta(seconds: float) -> str:
    """``seconds`` as ``H:MM:SS`` (``"?"`` when unknown)."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):  # NaN, negative, inf
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """Progress of steps ``initial``..``total`` on ``stream`` (default stderr).

    Args:
      total: the last step.
      initial: the step training starts (or resumes) from.
      enabled: False on every process but the first: nothing is shown.
      stream: where to write; a bar only when it is a terminal (``bar=None``) or ``bar=True``.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        enabled: bool = True,
        stream: IO[str] | None = None,
        bar: bool | None = None,
    ):
        self.total, self.initial, self.enabled = total, initial, enabled
        self.stream = sys.stderr if stream is None else stream
        self.step = initial
        self._start = time.perf_counter()
        use_bar = _is_terminal(self.stream) if bar is None else bar
        self._bar = (
            tqdm.tqdm(
                total=total,
                initial=initial,
                file=self.stream,
                dynamic_ncols=True,
                desc="train",
            )
            if enabled and use_bar
            else None
        )

    @property
    def has_bar(self) -> bool:
        """Whether a tqdm bar is shown (else plain lines)."""
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        """``n`` more steps done."""
        self.step += n
        if self._bar is not None:
            self._bar.update(n)

    def eta(self) -> float:
        """Seconds left at the mean time per step so far (NaN before the first step)."""
        done = self.step - self.initial
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self._start) / done * (self.total - self.step)

    def log(self, step: int, *, loss: float, learning_rate: float, tokens_per_s: float) -> None:
        """The training metrics of ``step``: the bar's postfix, or one plain line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{loss:.3f}", lr=f"{learning_rate:.2e}", tok_s=f"{tokens_per_s:.0f}"
            )
            return
        self.write(
            f"step {step}/{self.total}: loss {loss:.4f}, lr {learning_rate:.2e}, "
            f"{tokens_per_s:.0f} tokens/s, ETA {format_eta(self.eta())}"
        )

    def write(self, line: str) -> None:
        """One line of text (eval results), above the bar if there is one."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Ends the bar (a no-op for plain lines)."""
        if self._bar is not None:
            self._bar.close()
