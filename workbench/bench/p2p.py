"""`workbench bench p2p`: N hosts start one image at once, through P2P vs each from the registry.

For each host count N the benchmark builds two clusters of N network namespaces with shaped
links (400 Mbit/s per host, 100 Mbit/s out of the registry; `workbench.p2p.cluster.Cluster`):
one where every host's device reads the registry itself (the baseline), one where it reads
through its host's P2P agent. Every host then
cold-starts the same image at once (mount, read the start set). Printed per N, with ratios
P2P / direct measured in the same run:

- registry bytes: what the embedded registry served (the P2P target: about 1/N);
- mean and slowest start, seconds from the mount command to the last byte read.

The raw runs (`Cluster.summary` per run) can be saved for the scale model's calibration
(`--runs`; `notebooks/p2p-calibration.ipynb` reads them).

Caveats:
- needs root, iproute2, FUSE and loop devices; all hosts share this machine's cores, so start
  times at larger N measure CPU contention as much as the network (the model's CPU pool);
- device readahead makes the bytes a start reads vary a little from run to run.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path
from typing import TextIO

from workbench.bench.formats import Table

__all__ = ["P2PBenchmark", "bench_p2p"]

MB = 1_000_000


@dataclasses.dataclass
class P2PBenchmark:
    hosts: tuple[int, ...] = (1, 2, 3, 4, 5)
    mbps: float | None = 400.0
    registry_mbps: float | None = 100.0
    fanout: int = 4
    app_mib: int = 6
    rest_mib: int = 24
    repeats: int = 1

    @classmethod
    def quick(cls) -> P2PBenchmark:
        return cls(hosts=(3,), app_mib=4, rest_mib=8)


def bench_p2p(
    settings: P2PBenchmark, workdir: Path, out: TextIO = sys.stdout
) -> tuple[list[Table], list[dict]]:
    """Run the benchmark; returns the printed tables and the raw runs."""
    from workbench.p2p.cluster import Cluster

    table = Table(
        f"batch cold start, host links {settings.mbps or 'unshaped'} Mbit/s, registry "
        f"{settings.registry_mbps or 'unshaped'} Mbit/s, fan-out {settings.fanout}",
        [
            "hosts",
            "registry MB direct",
            "registry MB p2p",
            "bytes p2p/direct",
            "mean s direct",
            "mean s p2p",
            "mean p2p/direct",
            "max s direct",
            "max s p2p",
        ],
    )
    runs = []
    measured: dict[tuple[int, str], list[tuple[int, float, float]]] = {}
    for repeat in range(settings.repeats):
        for count in settings.hosts:
            for mode in ("direct", "p2p"):
                with Cluster(
                    workdir,
                    count,
                    mode=mode,
                    mbps=settings.mbps,
                    registry_mbps=settings.registry_mbps,
                    fanout=settings.fanout,
                    app_mib=settings.app_mib,
                    rest_mib=settings.rest_mib,
                ) as cluster:
                    summary = cluster.summary(cluster.start_all())
                summary["repeat"] = repeat
                runs.append(summary)
                seconds = [start["seconds"] for start in summary["starts"]]
                measured.setdefault((count, mode), []).append(
                    (summary["registry_bytes"], statistics.mean(seconds), max(seconds))
                )
            print(f"  repeat {repeat + 1}/{settings.repeats}: {count} hosts done", file=out)

    for count in settings.hosts:
        (bytes_d, mean_d, max_d), (bytes_p, mean_p, max_p) = (
            tuple(statistics.median(column) for column in zip(*measured[count, mode], strict=True))
            for mode in ("direct", "p2p")
        )
        table.rows.append(
            [
                count,
                bytes_d / MB,
                bytes_p / MB,
                bytes_p / max(bytes_d, 1),
                mean_d,
                mean_p,
                mean_p / mean_d,
                max_d,
                max_p,
            ]
        )
    print(table.render(), file=out)
    table.notes.append(
        "bytes p2p/direct: the registry's bytes with P2P over those without (target about 1/N)"
    )
    if settings.repeats > 1:
        table.notes.append(f"medians of {settings.repeats} repeats, run interleaved")
    print("\n".join(f"  {note}" for note in table.notes), file=out)
    return [table], runs
