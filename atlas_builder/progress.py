"""Progress: what a long build says while it runs, on a terminal or in a log file.

Owns `bar(total, what, unit)`: tqdm's bar when stderr is a terminal; when
it is not (a file, a CI log, a batch job's output), plain lines instead: one
when the work starts, one about every `EVERY_S` seconds (what, layer,
done/total, rate, ETA) and one when it ends. And `say(line)`, the stage
start and end lines. Knows nothing of what is being counted.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

EVERY_S = 10.0  # seconds between two progress lines in a log


def say(line: str, stream=None) -> None:
    stream = stream or sys.stderr
    print(f"atlas: {line}", file=stream, flush=True)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class LogBar:
    """The log-file form of a progress bar: a line at the start, about every EVERY_S seconds and at the end."""

    def __init__(self, total: int, what: str, unit: str, stream=None, every: float = EVERY_S, now=time.monotonic):
        self.total, self.what, self.stream, self.every, self.now = total, what, stream, every, now
        self.unit = unit + ("es" if unit.endswith(("ch", "s")) else "s")  # plural
        self.done, self.layer = 0, ""
        self.start = self.last = now()
        say(f"{what}: {total:,} {self.unit} to do", stream)

    def set_layer(self, layer: str) -> None:
        self.layer = layer

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.now() - self.last >= self.every:
            self.last = self.now()
            say(self.line(), self.stream)

    def line(self) -> str:
        elapsed = max(self.now() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        where = f" · {self.layer}" if self.layer else ""
        left = clock(eta) if eta != float("inf") else "?"
        return (f"{self.what}{where}: {self.done:,}/{self.total:,} {self.unit}, {rate:.3g} {self.unit}/s, "
                f"{clock(elapsed)} so far, about {left} left")

    def close(self) -> None:
        elapsed = self.now() - self.start
        say(f"{self.what}: {self.done:,}/{self.total:,} {self.unit} in {clock(elapsed)}", self.stream)


class TtyBar:
    """tqdm's bar, with the same small interface."""

    def __init__(self, total: int, what: str, unit: str):
        self.bar = tqdm(total=total, desc=what, unit=unit, leave=False)

    def set_layer(self, layer: str) -> None:
        self.bar.set_postfix_str(layer, refresh=False)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class NoBar:
    def set_layer(self, layer: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, what: str, unit: str, enabled: bool = True):
    """A progress bar for `total` units of work: tqdm on a terminal, lines in a log, nothing when disabled."""
    if not enabled:
        return NoBar()
    return TtyBar(total, what, unit) if sys.stderr.isatty() else LogBar(total, what, unit)
