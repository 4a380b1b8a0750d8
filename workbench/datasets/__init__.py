"""Evaluation images: real multi-layer OCI images built offline from recipes, with workloads.

The recipes are the TOML files in the top-level ``datasets/`` directory (one per image,
described in `workbench.datasets.recipe`); the engine (`workbench.datasets.engine`) builds
them from Debian packages (debootstrap, apt in a chroot), PyPI wheels and files,
reproducibly (the same recipe gives the same layer digests), into OCI image layouts cached by
recipe hash. Every image carries its workload: what it runs and when that counts as ready.

The API (what other parts of the workbench call):

    from workbench import datasets

    datasets.recipes()                      # ["busybox", "debian", "nginx", ...]
    path = datasets.build("redis")          # OCI layout dir, tag "redis"; at once if cached
    digest = datasets.push("redis", "127.0.0.1:5000/bench/redis:latest")
    wl = datasets.workload("redis")         # Workload(name, image, command, env, workdir,
                                            #          ports, probe, ready_means, timeout)

A caller that starts containers its own way (ctr, runc, a chroot) runs ``wl.command`` with
``wl.env`` in ``wl.workdir`` and asks ``wl.probe`` when the workload is ready;
``wl.probe.kind`` says what the probe wants (see `workbench.datasets.probes`):

    deadline = time.monotonic() + wl.timeout
    if wl.probe.kind in ("log", "output"):     # stdout and stderr merged into one pipe
        result = wl.probe.wait(process.stdout, deadline)
    elif wl.probe.kind == "http":               # the port on the host, or in a netns
        result = wl.probe.wait(f"127.0.0.1:{wl.probe.port}", deadline)
    else:                                       # "exit": the process itself
        result = wl.probe.wait(process, deadline)
    result.ready_at, result.evidence            # time.monotonic() and what was seen

`workbench.datasets.chroot` does exactly that over an unpacked image, without a runtime.
The CLI is ``workbench dataset list | build NAME | path NAME | push NAME REF | workload NAME
| run NAME``.

Caveats:
- building needs root; the Debian images need the Debian mirror (and python-numpy-pandas
  PyPI) and take minutes; busybox needs neither and takes seconds;
- see the caveats of `engine`, `layer`, `probes` and `chroot`.
"""

from __future__ import annotations

import os
from pathlib import Path

from workbench.datasets.engine import build_image, default_cache_dir
from workbench.datasets.probes import ExitProbe, HttpProbe, LineProbe, Probe, ReadyResult
from workbench.datasets.recipe import Recipe, Workload, load_recipe, recipes_dir

__all__ = [
    "ExitProbe",
    "HttpProbe",
    "LineProbe",
    "Probe",
    "ReadyResult",
    "Recipe",
    "Workload",
    "build",
    "default_cache_dir",
    "names",
    "push",
    "recipes",
    "recipes_dir",
    "workload",
]


def recipes() -> list[str]:
    """The names of the recipes in ``datasets/``, sorted."""
    return sorted(path.stem for path in recipes_dir().glob("*.toml"))


names = recipes
"""The same as `recipes()` (the name other parts of the workbench look for)."""


def build(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = False
) -> Path:
    """Build recipe `name` (at once when cached); returns its OCI layout dir (tag = name)."""
    return build_image(name, cache_dir=cache_dir, progress=progress)


def workload(name: str, variant: str | None = None) -> Workload:
    """The workload of image `name` (or its `variant`, a ``[workloads.VARIANT]`` table)."""
    recipe = load_recipe(name)
    key = variant or ""
    if key not in recipe.workloads:
        from workbench.errors import RecipeError

        known = sorted(k for k in recipe.workloads if k) or ["none"]
        raise RecipeError(f"recipe {name} has no workload variant {variant!r}; it has {known}")
    return recipe.workloads[key]


def push(
    name: str,
    reference: str,
    *,
    insecure: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Build `name` if needed and push it to `reference` (host/repo:tag); -> manifest digest."""
    from workbench.datasets.publish import push_layout

    layout = build(name, cache_dir=cache_dir)
    return push_layout(layout, reference, tag=name, insecure=insecure)
