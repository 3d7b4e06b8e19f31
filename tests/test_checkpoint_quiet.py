"""A full disk during a checkpoint is one line: the closed-loop callbacks of the failed
write (``RuntimeError: Event loop is closed`` through ``sys.unraisablehook``) are dropped,
and nothing else is."""

from __future__ import annotations

import asyncio
import sys
import types

from cgmq_jax.runs import checkpoint


def _unraisable(error_from):
    try:
        error_from()
    except BaseException as error:  # noqa: BLE001 - the unraisable of a callback
        return types.SimpleNamespace(
            exc_type=type(error),
            exc_value=error,
            exc_traceback=error.__traceback__,
            err_msg=None,
            object=None,
        )
    raise AssertionError("expected an exception")


def _closed_loop_callback():
    loop = asyncio.new_event_loop()
    loop.close()
    loop.call_soon_threadsafe(print)  # what TensorStore does after Orbax closed its loop


def _another_error():
    raise RuntimeError("Event loop is closed")  # same words, not from asyncio


def test_closed_loop_callbacks_are_dropped_and_nothing_else(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint._silence_closed_loop_callbacks()
    checkpoint._silence_closed_loop_callbacks()  # installed once: no chain of filters
    assert getattr(sys.unraisablehook, "_cgmq_closed_loop_filter", False)
    sys.unraisablehook(_unraisable(_closed_loop_callback))
    assert seen == []
    other = _unraisable(_another_error)
    sys.unraisablehook(other)
    value = _unraisable(lambda: 1 / 0)
    sys.unraisablehook(value)
    assert seen == [other, value]
