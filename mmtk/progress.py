"""Progress shown to a user: the training line (fitted to the terminal, plain lines in logs) and its ETA, and the
bar of work counted in frames (convert, pseudo-label)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any


def format_eta(seconds: float) -> str:
    """``eta 1:02:03`` (hours:minutes:seconds); ``eta --`` while unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "eta --"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"eta {hours}:{minutes:02d}:{secs:02d}"


def counted(count: int, noun: str) -> str:
    """``1 frame``, ``2 frames``: a count with its noun, in the plural where it is not one (the one place)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_duration(seconds: float) -> str:
    """``42 s``, ``7.3 min``, ``5.2 h``, ``9.5 days``: a duration told to a user, with its unit."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def progress_text(step: int, stop: int, micro: int, accum: int, images_per_s: float, eta_s: float,
                  losses: dict[str, float], lr: float | None, width: int | None) -> str:
    """The progress line: step (and micro-step inside a long step), images/s and a labelled ETA always; then,
    as far as ``width`` allows, a bar, the loss, the lr and each task's loss (None: everything)."""
    where = f"step {step}/{stop}" + (f" micro {micro}/{accum}" if 0 < micro < accum else "")
    line = f"{where} {images_per_s:.1f} img/s {format_eta(eta_s)}"
    if width is not None and len(line) > width and where != f"step {step}/{stop}":  # very narrow: no micro-step
        return progress_text(step, stop, 0, accum, images_per_s, eta_s, losses, lr, width)
    optional = []
    if "loss" in losses:
        optional.append(f"loss {losses['loss']:.4f}")
    if lr is not None:
        optional.append(f"lr {lr:.2e}")
    optional += [f"{name} {value:.4f}" for name, value in losses.items() if name != "loss"]
    if width is None:
        return " ".join([line, *optional])
    bar = 20 if len(line) + 1 + 20 + len(optional[0] if optional else "") + 1 <= width else 0  # room for the loss too
    if bar:
        done = round(bar * step / max(stop, 1))
        line = f"{where} {'━' * done}{'╺' if done < bar else ''}{' ' * max(bar - done - 1, 0)} " \
               f"{images_per_s:.1f} img/s {format_eta(eta_s)}"
    for part in optional:
        if len(line) + 1 + len(part) > width:
            break  # losses drop first, in order: the task losses, then lr, then the total loss
        line += " " + part
    return line


class ProgressLine:
    """Training progress: on a terminal one line redrawn in place, fitted to its width; otherwise (logs, CI)
    plain lines, one per logged step, plus one at least every minute inside long optimizer steps.

    The rate counts micro-steps (images seen), so a long optimizer step still moves the line.
    """

    PLAIN_EVERY_S = 60.0
    LONG_RUN_S = 3600.0  # a CPU run estimated beyond this is told so once, with what a GPU would take
    # A reference for that note: `mmtk pretrain base` on one H200 in bf16 (README, The engine: about 1700 images/s).
    GPU_IMAGES_PER_S = 1700.0

    def __init__(self, enabled: bool, stop: int, accum: int, images_per_micro: int, on_cpu: bool = False) -> None:
        from rich.console import Console

        self.enabled, self.stop, self.accum, self.images_per_micro = enabled, stop, accum, images_per_micro
        self.estimate_pending = enabled and on_cpu
        self.console = Console()
        self.live = None
        if enabled and self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.losses: dict[str, float] = {}
        self.lr: float | None = None
        self.step, self.micro = 0, 0
        self.start_images, self.start_time, self.last_plain = 0, time.perf_counter(), time.perf_counter()

    def __enter__(self) -> ProgressLine:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def start(self, step: int) -> None:
        """The run starts (or resumes) at optimizer step ``step``: the rate counts from here."""
        self.step, self.start_images, self.start_time = step, self._images(step, 0), time.perf_counter()
        self._show()

    def micro_step(self, step: int, micro: int) -> None:
        """Micro-step ``micro`` of the step after ``step`` is done."""
        self.step, self.micro = step, micro
        if self.estimate_pending and (step * self.accum + micro) - self.start_images // self.images_per_micro >= 2:
            self._estimate()
        if self.live is not None:
            self._show()
        elif self.enabled and micro < self.accum and time.perf_counter() - self.last_plain >= self.PLAIN_EVERY_S:
            self._print()  # a long optimizer step is never silent in a log

    def step_done(self, step: int, losses: dict[str, float], lr: float) -> None:
        """Optimizer step ``step`` is done with these losses, at learning rate ``lr``."""
        self.step, self.micro, self.losses, self.lr = step, 0, losses, lr
        if self.live is not None:
            self._show()

    def log(self) -> None:
        """The step just done is a logged one: a plain line when not on a terminal."""
        if self.enabled and self.live is None:
            self._print()

    def _images(self, step: int, micro: int) -> int:
        return (step * self.accum + micro) * self.images_per_micro

    def _rate_eta(self) -> tuple[float, float]:
        seen = self._images(self.step, self.micro) - self.start_images
        elapsed = time.perf_counter() - self.start_time
        rate = seen / elapsed if seen and elapsed > 0 else 0.0
        left = self._images(self.stop, 0) - self._images(self.step, self.micro)
        return rate, left / rate if rate > 0 else float("nan")

    def _estimate(self) -> None:
        """Once, after the first two micro-steps: a CPU run that takes hours says so, with a GPU's time."""
        self.estimate_pending = False
        rate, eta = self._rate_eta()
        if not math.isfinite(eta) or eta < self.LONG_RUN_S:
            return
        left = self._images(self.stop, 0) - self._images(self.step, self.micro)
        print(f"note: at {rate:.1f} images/s this CPU run needs about {format_duration(eta)} for its {self.stop} "
              f"steps; it is a GPU's job (one H200 trains `base` at about {self.GPU_IMAGES_PER_S:.0f} images/s: "
              f"about {format_duration(left / self.GPU_IMAGES_PER_S)}); on a CPU try --set train.max_steps=N or "
              f"the tiny recipe", file=sys.stderr, flush=True)

    def step_time_left(self) -> float:
        """Seconds until the optimizer step under way is done, at the rate so far (NaN while unknown)."""
        rate, _ = self._rate_eta()
        left = (self.accum - self.micro) * self.images_per_micro
        return left / rate if rate > 0 else float("nan")

    def _show(self) -> None:
        if self.live is None:
            return
        from rich.text import Text

        rate, eta = self._rate_eta()
        text = progress_text(self.step, self.stop, self.micro, self.accum, rate, eta, self.losses, self.lr,
                             self.console.width - 1)
        self.live.update(Text(text, no_wrap=True, overflow="crop"))

    def _print(self) -> None:
        rate, eta = self._rate_eta()
        print(progress_text(self.step, self.stop, self.micro, self.accum, rate, eta, self.losses, self.lr, None),
              flush=True)
        self.last_plain = time.perf_counter()


@contextlib.contextmanager
def frame_bar(label: str, total: int | None, enabled: bool, done: int = 0) -> Iterator[Callable[[int], None]]:
    """A bar for work counted in frames: label, bar, done/total, percent, frames/s, elapsed time and ``eta``.

    Yields ``advance(frames)``; ``done`` frames count as finished before the start (a resumed job). With
    ``enabled`` false nothing is drawn.
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, disable=not enabled, transient=False) as bar:
        task = bar.add_task(label, total=total, completed=done, rate="")

        def advance(frames: int) -> None:
            bar.advance(task, frames)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.1f} frames/s" if speed else "")

        yield advance
