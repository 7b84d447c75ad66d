"""A one-line live status of a COLO VM on the terminal, e.g.::

    COLO primary | checkpoints 42 (ok 42) | last pause 3.1 ms | median 2.9 ms | dirty 310 pages | peer alive | serving

Off unless the stream is a terminal, so logs and pipes never get cursor movements.
"""

import math
import sys
import time

MIN_INTERVAL = 0.1  # s between redraws: at most 10 per second, however often checkpoints come


def _ms(v):
    return f"{v:.1f} ms"


# Known fields in display order: name -> how it reads.
_FORMATS = {
    "role": lambda v: f"COLO {v}",
    "checkpoints": None,  # with "ok", below
    "last_pause_ms": lambda v: f"last pause {_ms(v)}",
    "median_pause_ms": lambda v: f"median {_ms(v)}",
    "dirty_pages": lambda v: f"dirty {v} pages",
    "peer": lambda v: f"peer {v}",
    "state": str,
}


def format_status(fields):
    """The status text from ``fields`` (role, checkpoints, ok, last_pause_ms, median_pause_ms,
    dirty_pages, peer, state; any other name is shown as ``name value`` at the end).
    A field that is absent or None is left out."""
    parts = []
    for name, fmt in _FORMATS.items():
        value = fields.get(name)
        if value is None:
            continue
        if name == "checkpoints":
            ok = fields.get("ok")
            parts.append(f"checkpoints {value}" + (f" (ok {ok})" if ok is not None else ""))
        else:
            parts.append(fmt(value))
    for name, value in fields.items():
        if name not in _FORMATS and name != "ok" and value is not None:
            parts.append(f"{name.replace('_', ' ')} {value}")
    return " | ".join(parts)


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed file
        return False


class StatusLine:
    """The live line.  :meth:`update` merges the fields given into those already shown, so a
    caller passes only what changed; redraws are throttled to :data:`MIN_INTERVAL` and the
    latest fields are drawn at the next update after it, or at :meth:`close`."""

    def __init__(self, stream=None, enabled=None, min_interval=MIN_INTERVAL):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _isatty(self.stream) if enabled is None else bool(enabled)
        self.min_interval = min_interval
        self.fields = {}
        self._live = None
        self._drawn_at = -math.inf
        self._pending = False

    def update(self, **fields):
        if not self.enabled:
            return
        self.fields.update(fields)
        self._pending = True
        if time.monotonic() - self._drawn_at >= self.min_interval:
            self._draw()

    def close(self):
        """Draw the latest fields and leave the line on the terminal."""
        if self._live is None:
            return
        if self._pending:
            self._live.update(self._text())  # stop() draws it
        self._live.stop()
        self._live = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _text(self):
        from rich.text import Text

        return Text(format_status(self.fields), no_wrap=True, overflow="ellipsis")

    def _draw(self):
        if self._live is None:
            from rich.console import Console
            from rich.live import Live

            # force_terminal: enabled=True on a non-terminal means "draw anyway".  stdout is
            # left alone: it may carry the guest's serial port.
            console = Console(file=self.stream, force_terminal=True)
            self._live = Live(self._text(), console=console, auto_refresh=False, redirect_stdout=False,
                              redirect_stderr=self.stream is sys.stderr)
            self._live.start()
        self._live.update(self._text(), refresh=True)
        self._drawn_at = time.monotonic()
        self._pending = False
