"""Training progress: a bar on a terminal, plain lines (no carriage returns) elsewhere."""

import io
import re

from attnzoo.training import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = progress.Progress(10, 0, stream=out)
    assert not p.has_bar
    for step in range(1, 5):
        p.update()
        if step % 2 == 0:
            p.log(step, loss=2.5, learning_rate=1e-3, tokens_per_s=1234.4)
    p.write("step 4: eval_loss 2.0000")
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    pattern = r"step (2|4)/10: loss 2\.5000, lr 1\.00e-03, 1234 tokens/s, ETA \d+:\d\d:\d\d"
    assert all(re.fullmatch(pattern, line) for line in lines[:2]), lines
    assert lines[2] == "step 4: eval_loss 2.0000"


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
    out = _Terminal()
    p = progress.Progress(10, 0, stream=out)
    assert p.has_bar
    p.update()
    p.log(1, loss=2.5, learning_rate=1e-3, tokens_per_s=10.0)
    p.close()
    assert "\r" in out.getvalue() and "loss=2.500" in out.getvalue()
    quiet = io.StringIO()
    p = progress.Progress(10, 0, stream=quiet, enabled=False)
    p.update()
    p.log(1, loss=1.0, learning_rate=1.0, tokens_per_s=1.0)
    p.write("x")
    p.close()
    assert quiet.getvalue() == ""


def test_format_eta():
    assert progress.format_eta(3725.4) == "1:02:05"
    assert progress.format_eta(float("nan")) == "?"
