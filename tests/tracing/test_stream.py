"""Live trace streams: tracing switched on only while followed, alongside a recording."""

from __future__ import annotations

from workbench.tracing import core, recording, request
from workbench.tracing.stream import TraceHub, event_json


def emit_one(offset: int) -> None:
    recorder = core.recorder
    if recorder is not None:
        recorder.emit("lsmt", "read", "layer", offset, 512, core.time.perf_counter_ns(), 512)


def test_tracing_is_on_only_while_someone_follows() -> None:
    hub = TraceHub()
    assert core.recorder is None
    first, second = hub.follow(), hub.follow()
    assert core.recorder is not None and hub.active
    with request("test"):
        emit_one(0)
    hub.unfollow(first)
    emit_one(512)
    hub.unfollow(second)
    assert core.recorder is None and not hub.active
    emit_one(1024)

    assert [event.offset for event in first.drain() if event.layer == "lsmt"] == [0]
    events = second.drain()
    assert [event.offset for event in events if event.layer == "lsmt"] == [0, 512]
    lsmt, req = events[0], events[1]
    assert req.layer == "request" and lsmt.request_id == req.request_id != 0


def test_a_recording_in_force_keeps_its_events_while_followed() -> None:
    hub = TraceHub()
    with recording() as recorder:
        follower = hub.follow()
        emit_one(4096)
        hub.unfollow(follower)
        assert core.recorder is recorder
        emit_one(8192)
    assert [event.offset for event in recorder.events] == [4096, 8192]
    assert [event.offset for event in follower.drain()] == [4096]


def test_a_follower_that_falls_behind_loses_the_oldest_events_and_counts_them() -> None:
    hub = TraceHub()
    follower = hub.follow(capacity=3)
    for offset in range(5):
        emit_one(offset)
    hub.unfollow(follower)
    assert [event.offset for event in follower.drain()] == [2, 3, 4]
    assert follower.dropped == 2


def test_an_event_as_json_counts_microseconds_from_the_origin() -> None:
    hub = TraceHub()
    follower = hub.follow()
    emit_one(7)
    hub.unfollow(follower)
    (event,) = follower.drain()
    line = event_json(event, event.start_ns - 2000)
    assert line["ts_us"] == 2.0 and line["offset"] == 7 and line["layer"] == "lsmt"
