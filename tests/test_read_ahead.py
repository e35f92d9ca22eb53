"""convert's reader process (read_ahead): same frames in the same order, errors come back as one line."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mmtk.data.convert import read_ahead
from mmtk.data.sources.frame import Frame
from mmtk.errors import MmtkError


def _frames(count: int, fail_at: int | None = None, die_at: int | None = None):
    def frames():
        for i in range(count):
            if i == fail_at:
                raise MmtkError(f"frame {i} is corrupt")
            if i == die_at:
                os._exit(9)  # the reader process dies without a word (killed, out of memory)
            yield Frame("all", {"rgb": np.full((4, 5, 3), i, np.uint8)}, frame_id=str(i))
    return frames


def test_frames_arrive_whole_and_in_order():
    got = list(read_ahead(_frames(20), depth=2))
    assert [f.frame_id for f in got] == [str(i) for i in range(20)]
    assert all((f.arrays["rgb"] == i).all() and f.arrays["rgb"].shape == (4, 5, 3) for i, f in enumerate(got))


def test_an_error_in_the_reader_is_raised_in_the_writer():
    got = []
    with pytest.raises(MmtkError, match="frame 3 is corrupt"):
        for frame in read_ahead(_frames(10, fail_at=3)):
            got.append(frame.frame_id)
    assert got == ["0", "1", "2"]


def test_a_dead_reader_is_one_line():
    with pytest.raises(MmtkError, match=r"frame reader process stopped \(exit code 9\)"):
        list(read_ahead(_frames(10, die_at=2)))


def test_a_writer_that_stops_early_does_not_wait_for_the_reader():
    """The writer fails (full disk) with the reader's queue full: it must come back at once, whatever signal
    handlers the process has (the CLI's SIGTERM handler raises, which once hung the reader's exit)."""
    import signal
    import time

    def raising(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raising)
    try:
        frames = read_ahead(lambda: (Frame("all", {"rgb": np.zeros((480, 640, 3), np.uint8)}) for _ in range(50)))
        start = time.monotonic()
        next(frames)
        time.sleep(0.5)  # the reader fills the queue and blocks
        frames.close()  # as when write_frames raises
        assert time.monotonic() - start < 10
    finally:
        signal.signal(signal.SIGTERM, previous)
