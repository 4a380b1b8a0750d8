"""Tracing: one event model for every layer, recorded in memory and exported for analysis.

Use `recording()` around any code to collect events, `request()` to group the events of one
top-level request, and `TracedFile` to trace any random-access file from outside. Layers emit
their own events by reading `core.recorder`; see `workbench.tracing.core`.
"""

from workbench.tracing.core import (
    EVENT_COLUMNS,
    Event,
    Recorder,
    current_request,
    recording,
    request,
)
from workbench.tracing.wrap import TracedFile

__all__ = [
    "EVENT_COLUMNS",
    "Event",
    "Recorder",
    "TracedFile",
    "current_request",
    "recording",
    "request",
]
