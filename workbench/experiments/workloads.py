"""Workloads by name: the datasets' images where `workbench.datasets` has them, else stand-ins.

`prepare(name, registry)` returns the `Workload` (command, env, how "ready" is told) and the
two references a trial starts from, both already pushed to `registry` (``host:port``): the
OCI image of ``.tar.gz`` layers and its OverlayBD form. It also returns the image's sizes in
each form, for the image-size study.

- A name `workbench.datasets` knows: ``datasets.push(name, oci_ref)`` uploads the OCI image,
  ``workbench.convert.convert_image(oci_ref, lazy_ref)`` makes and pushes the OverlayBD image,
  ``datasets.workload(name)`` gives command, env, workdir, probe and ``ready_means``;
  `dataset_workload` maps the probe's kind onto the launcher (see there).
- A ``standin-*`` name: `workbench.experiments.standin` builds it from this machine's files.

Caveats:
- a datasets image is converted afresh in every run (no cache of converted images), which
  takes tens of seconds for the Debian-based ones;
- sizes of a datasets image: tar and LSMT from the conversion report, tar.gz and ZFile from
  the blobs in the registry;
- the ``http`` workloads run in their own network namespace; the others share the host's.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import subprocess
from dataclasses import dataclass
from typing import Any

from workbench.datasets.chroot import OutputTail
from workbench.datasets.probes import drain
from workbench.errors import ExperimentError, ProbeError, WorkbenchError
from workbench.experiments import standin
from workbench.experiments.systems import Workload

__all__ = [
    "PreparedImage",
    "available_workloads",
    "dataset_workload",
    "prefetch_available",
    "prepare",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedImage:
    """A workload with its image pushed in both forms, and the image's sizes."""

    workload: Workload
    oci_ref: str
    lazy_ref: str
    sizes: dict[str, float]
    source: str
    """``standin`` or ``datasets``."""
    raw_ext4: str | None = None
    """The image's ext4 as a raw disk file, when it is at hand (stand-ins)."""


def _datasets() -> Any | None:
    if importlib.util.find_spec("workbench.datasets") is None:
        return None
    return importlib.import_module("workbench.datasets")


def available_workloads() -> list[str]:
    names = list(standin.STANDINS)
    datasets = _datasets()
    if datasets is not None and hasattr(datasets, "names"):
        names += list(datasets.names())
    return names


def prefetch_available() -> str | None:
    """None if trace prefetch (`workbench.prefetch`) is here, else why lazy-prefetch is not."""
    if importlib.util.find_spec("workbench.prefetch") is not None:
        return None
    return (
        "trace prefetch (record/replay) is not in this workbench: workbench.prefetch is "
        "missing, so lazy-prefetch has no results"
    )


def prepare(name: str, registry: str) -> PreparedImage:
    """Push workload `name`'s image to `registry` in both forms; see the module docstring."""
    if name in standin.STANDINS:
        return _prepare_standin(name, registry)
    datasets = _datasets()
    if datasets is None:
        raise ExperimentError(
            f"no workload {name!r}: workbench.datasets is not on this branch yet; the stand-ins "
            f"are {', '.join(standin.STANDINS)}"
        )
    return _prepare_dataset(datasets, name, registry)


def _prepare_standin(name: str, registry: str) -> PreparedImage:
    spec = standin.STANDINS[name]
    built = standin.build_standin(name)
    oci_ref, lazy_ref = standin.push_standin(built, registry)
    workload = Workload(
        name=name,
        command=spec.command,
        env=dict(spec.env),
        ready_means=spec.ready_means,
        standin=True,
    )
    sizes = {form: float(nbytes) for form, nbytes in built.sizes().items()}
    return PreparedImage(workload, oci_ref, lazy_ref, sizes, "standin", str(built.raw_ext4))


def _prepare_dataset(datasets: Any, name: str, registry: str) -> PreparedImage:
    try:
        convert = importlib.import_module("workbench.convert")
    except ImportError as exc:
        raise ExperimentError(
            f"workload {name!r} needs workbench.convert to make its OverlayBD image: {exc}"
        ) from exc
    oci_ref = f"{registry}/datasets/{name}:oci"
    lazy_ref = f"{registry}/datasets/{name}:overlaybd"
    try:
        spec = datasets.workload(name)
        datasets.push(name, oci_ref)
        log.info("converting %s to OverlayBD (%s)", name, lazy_ref)
        report = convert.convert_image(oci_ref, lazy_ref, sizes=False)
    except WorkbenchError:
        raise
    except Exception as exc:  # another module's failure, named with the workload
        raise ExperimentError(f"preparing workload {name!r} failed: {exc}") from exc

    sizes = _registry_sizes(oci_ref, lazy_ref)
    sizes["tar"] = float(report.tar_bytes)
    sizes["lsmt"] = float(sum(layer.lsmt for layer in report.layers))
    return PreparedImage(dataset_workload(spec), oci_ref, lazy_ref, sizes, "datasets")


def dataset_workload(spec: Any) -> Workload:
    """The runner's `Workload` for a `workbench.datasets.Workload` (`spec`).

    The probe decides readiness through `Workload.ready`, by its kind: ``exit`` waits for the
    process (its code, and its output when the probe names one); ``log`` and ``output`` read
    the merged stdout and stderr for the line; ``http`` polls ``GET path`` every 10 ms from
    inside the workload's own network namespace (`private_net`, so fixed ports such as 80
    never meet another start's), the output drained meanwhile. `ready_means` is the recipe's
    sentence, which the results carry.
    """
    probe = spec.probe
    if probe.kind not in ("exit", "log", "output", "http"):
        raise ExperimentError(
            f"workload {spec.name}: probe kind {probe.kind!r} is not one the runner can wait "
            "for (exit, log, output, http); give the recipe one of those"
        )
    return Workload(
        name=spec.name,
        command=tuple(spec.command),
        env=dict(spec.env) or {"PATH": "/usr/bin:/bin"},
        ready_means=str(spec.ready_means),
        workdir=spec.workdir or "/",
        ready=functools.partial(_wait_probe, probe),
        private_net=probe.kind == "http",
    )


def _wait_probe(probe: Any, process: subprocess.Popen[bytes], deadline: float) -> str:
    """Wait with a datasets probe on a process started by `systems.launch`; -> evidence."""
    if probe.kind == "exit":
        return probe.wait(process, deadline).evidence
    if probe.kind in ("log", "output"):
        return probe.wait(process.stdout, deadline, process=process).evidence
    tail = OutputTail()
    drain(process.stdout, tail)
    try:
        netns = f"/proc/{process.pid}/ns/net"
        return probe.wait(None, deadline, netns=netns, process=process).evidence
    except ProbeError as exc:
        raise type(exc)(f"{exc}; its last output: {tail.text()}") from None


def _registry_sizes(oci_ref: str, lazy_ref: str) -> dict[str, float]:
    from workbench.registry.reference import ImageReference
    from workbench.registry.session import RegistrySession

    with RegistrySession(use_cache=False) as session:
        oci = session.run(session.client.resolve, ImageReference.parse(oci_ref))
        lazy = session.run(session.client.resolve, ImageReference.parse(lazy_ref))
    return {
        "tar": float("nan"),
        "tar.gz": float(sum(layer.size for layer in oci.layers)),
        "lsmt": float("nan"),
        "zfile": float(sum(layer.size for layer in lazy.layers)),
    }
