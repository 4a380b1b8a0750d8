"""Metrics parts that need no mount: histograms, the hang detector, addresses, the text."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from workbench.device.metrics import (
    DeviceMetrics,
    HangDetector,
    Histogram,
    InFlight,
    make_registry,
    parse_address,
)


def test_a_histogram_counts_each_observation_in_its_bucket_cumulatively() -> None:
    histogram = Histogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.005, 2.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert histogram.sum == pytest.approx(2.0065)


def test_the_detector_reports_a_request_once_when_it_passes_the_threshold(
    caplog: pytest.LogCaptureFixture,
) -> None:
    in_flight = {1: InFlight("read", 4096, 8192, started=100.0)}
    detector = HangDetector(in_flight, threshold_s=5.0)
    assert detector.check(now=104.0) == []
    with caplog.at_level(logging.WARNING):
        assert [request.offset for request in detector.check(now=105.5)] == [4096]
    assert "in flight for 5.5 s" in caplog.text
    assert detector.check(now=200.0) == []
    assert detector.hangs_total == 1 and detector.hung_now() == 1
    del in_flight[1]
    assert detector.hung_now() == 0 and detector.hangs_total == 1


def test_the_text_holds_device_counters_latency_and_hangs() -> None:
    device = DeviceMetrics()
    device.observe("read", 4096, 0.0002)
    device.observe("read", 0, 0.5, "EIO")
    detector = HangDetector({}, 1.0)
    detector.hangs_total = 3
    text = generate_latest(make_registry(device, detector, lambda: None)).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("workbench_device_requests_total", (("op", "read"),))] == 2
    assert samples[("workbench_device_bytes_total", (("op", "read"),))] == 4096
    assert samples[("workbench_device_errors_total", (("errno", "EIO"), ("op", "read")))] == 1
    assert (
        samples[("workbench_device_request_seconds_bucket", (("le", "+Inf"), ("op", "read")))] == 2
    )
    assert samples[("workbench_device_hangs_total", ())] == 3
    assert samples[("workbench_zfile_failures_total", (("kind", "crc"),))] >= 0


@pytest.mark.parametrize(
    ("address", "expected"),
    [("9863", ("127.0.0.1", 9863)), ("0.0.0.0:0", ("0.0.0.0", 0)), ("[::1]:80", ("[::1]", 80))],
)
def test_addresses_are_port_or_host_and_port(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


def test_a_bad_address_names_the_expected_forms() -> None:
    with pytest.raises(ValueError, match="expected PORT or HOST:PORT"):
        parse_address("localhost:http")
