"""Ctrl-C: the CLI's SIGINT handler remembers the interrupt, so a run whose KeyboardInterrupt was swallowed by
some library (an `except BaseException`, a finalizer) still never publishes its output folder."""

from __future__ import annotations

import os
import signal
import time

import pytest

from compressor import cli
from compressor.artifacts import INTERRUPTED, atomic_output


def test_swallowed_keyboard_interrupt_does_not_publish(tmp_path):
    out = tmp_path / "run"
    previous = signal.signal(signal.SIGINT, cli._on_sigint)
    INTERRUPTED.clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_output(out, overwrite=False) as tmp:
                (tmp / "manifest.json").write_text("{}")
                try:  # a library that catches everything
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)
                except BaseException:  # noqa: BLE001
                    pass
                (tmp / "report.json").write_text("{}")  # the run goes on to the end
    finally:
        signal.signal(signal.SIGINT, previous)
        INTERRUPTED.clear()
    assert list(tmp_path.iterdir()) == []


def test_main_clears_the_flag_and_restores_the_handler(tmp_path, capsys):
    INTERRUPTED.set()
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["targets"]) == 0
    assert not INTERRUPTED.is_set() and signal.getsignal(signal.SIGINT) is before
    assert "h200" in capsys.readouterr().out
