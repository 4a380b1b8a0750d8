"""The engine for real on the tiny image: busybox built, rebuilt the same, started, pushed.

Needs root, unshare, chroot, umoci and busybox-static (all from scripts/setup.sh); skips
without them unless CI is set. No network: busybox's recipe and the derived recipes below
use only host files. The Debian images are in test_dataset_debian.py, under an opt-in.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from dataset_support import need, need_builder
from registries import REGISTRIES, containerd_daemon, start_registry

from workbench import datasets
from workbench.cli.dataset import dataset as dataset_command
from workbench.datasets import engine as engine_module
from workbench.datasets.chroot import start, unpack
from workbench.datasets.engine import build_image
from workbench.errors import BuildError, RecipeError
from workbench.registry.client import OCI_MANIFEST


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_builder()
    return tmp_path_factory.mktemp("datasets-cache")


@pytest.fixture(scope="module")
def busybox(cache: Path) -> Path:
    return datasets.build("busybox", cache_dir=cache)


def _index(layout: Path) -> dict:
    return json.loads((layout / "index.json").read_text())


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def _manifest(layout: Path) -> dict:
    return json.loads(_blob(layout, _index(layout)["manifests"][0]["digest"]).read_text())


def test_busybox_is_an_oci_layout(busybox: Path) -> None:
    entry = _index(busybox)["manifests"][0]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "busybox"
    manifest = _manifest(busybox)
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ]
    config = json.loads(_blob(busybox, manifest["config"]["digest"]).read_text())
    workload = json.loads(config["config"]["Labels"]["org.workbench.dataset.workload"])
    assert workload["ready"] == {"http": "/", "port": 8080, "status": 200, "host": "localhost"}
    assert config["config"]["Cmd"][:2] == ["/bin/busybox", "httpd"]

    with tarfile.open(_blob(busybox, manifest["layers"][0]["digest"]), "r:gz") as tar:
        names = tar.getnames()
        assert tar.getmember("bin/busybox").isreg()
        assert tar.getmember("bin/ls").issym()
    assert names == sorted(names)


def test_skopeo_reads_the_layout(busybox: Path) -> None:
    need(shutil.which("skopeo") is not None, "skopeo is not installed")
    result = subprocess.run(
        ["skopeo", "inspect", f"oci:{busybox}:busybox"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Digest"] == _index(busybox)["manifests"][0]["digest"]


def test_same_recipe_same_digests(busybox: Path, tmp_path: Path) -> None:
    again = datasets.build("busybox", cache_dir=tmp_path / "other-cache")
    assert (again / "index.json").read_bytes() == (busybox / "index.json").read_bytes()
    assert _manifest(again) == _manifest(busybox)


def test_cached_build_does_no_work(
    busybox: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("a cached image was built again")

    monkeypatch.setattr(engine_module, "_build_layers", refuse)
    assert datasets.build("busybox", cache_dir=cache) == busybox


def _derived_recipes(tmp_path: Path) -> Path:
    """busybox, and a recipe on it whose layer deletes one file and adds another."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(datasets.recipes_dir() / "busybox.toml", recipes / "busybox.toml")
    (recipes / "busybox-more.toml").write_text(
        'base = "busybox"\n'
        "[[layers]]\n"
        'comment = "a new page instead of the old one"\n'
        'files = [{ path = "/www/new.html", text = "new\\n" }]\n'
        'run = "rm /www/index.html"\n'
        "[workload]\n"
        'command = ["/bin/cat", "/www/new.html"]\n'
        'ready = { exit = 0, output = "new" }\n'
        'ready_means = "the new page is there"\n'
    )
    return recipes


def test_derived_image_shares_the_base_layer_and_deletes(
    busybox: Path, cache: Path, tmp_path: Path
) -> None:
    recipes = _derived_recipes(tmp_path)
    layout = build_image("busybox-more", cache_dir=cache, recipes=recipes)

    base_layer, top_layer = _manifest(layout)["layers"]
    assert base_layer == _manifest(busybox)["layers"][0]
    assert _blob(layout, base_layer["digest"]).stat().st_ino == (
        _blob(busybox, base_layer["digest"]).stat().st_ino
    )
    with tarfile.open(_blob(layout, top_layer["digest"]), "r:gz") as tar:
        names = set(tar.getnames())
    assert {"www/.wh.index.html", "www/new.html"} <= names

    rootfs = unpack(layout, tmp_path / "bundle")
    assert not (rootfs / "www" / "index.html").exists()
    assert (rootfs / "www" / "new.html").read_text() == "new\n"


def test_failed_step_names_layer_and_log(cache: Path, tmp_path: Path) -> None:
    recipes = _derived_recipes(tmp_path)
    (recipes / "broken.toml").write_text(
        'base = "busybox"\n[[layers]]\ncomment = "fails"\nrun = "echo about to fail; exit 7"\n'
        '[workload]\ncommand = ["true"]\nready = { exit = 0 }\nready_means = "never"\n'
    )
    with pytest.raises(BuildError, match=r"layer 1 \(fails\).*exit code 7") as caught:
        build_image("broken", cache_dir=cache, recipes=recipes)
    assert "about to fail" in str(caught.value)
    leftovers = list((cache / "tmp").iterdir())
    assert [p.name for d in leftovers for p in d.iterdir()] == ["build.log"]
    assert not (cache / "images" / "broken").exists()
    for directory in leftovers:
        shutil.rmtree(directory)


def test_a_file_over_a_directory_is_refused(cache: Path, tmp_path: Path) -> None:
    recipes = _derived_recipes(tmp_path)
    (recipes / "clash.toml").write_text(
        'base = "busybox"\n[[layers]]\nfiles = [{ path = "/www", text = "x" }]\n'
        '[workload]\ncommand = ["true"]\nready = { exit = 0 }\nready_means = "never"\n'
    )
    before = set((cache / "tmp").iterdir()) if (cache / "tmp").exists() else set()
    with pytest.raises(RecipeError, match="/www is a directory in the image"):
        build_image("clash", cache_dir=cache, recipes=recipes)
    assert set((cache / "tmp").iterdir()) == before


def test_leftovers_of_a_killed_build_are_removed(cache: Path, tmp_path: Path) -> None:
    recipes = _derived_recipes(tmp_path)
    (recipes / "busybox-again.toml").write_text(
        (recipes / "busybox-more.toml").read_text().replace("new page", "newer page")
    )
    killed = [
        cache / "tmp" / "0123-99999" / "upper" / "file",
        cache / "blobs" / "sha256" / ".layer-99999.tmp",
        cache / "images" / ".busybox.tmp-99999" / "index.json",
    ]
    for path in killed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")

    build_image("busybox-again", cache_dir=cache, recipes=recipes)

    assert not any(path.exists() for path in killed)
    assert not (cache / "tmp" / "0123-99999").exists()


def _mounted(path: Path) -> bool:
    return str(path) in Path("/proc/self/mountinfo").read_text()


def test_workloads_reach_ready_in_a_chroot(busybox: Path, tmp_path: Path) -> None:
    rootfs = unpack(busybox, tmp_path / "bundle")
    run_dir = tmp_path / "run"

    with start(datasets.workload("busybox"), rootfs, run_dir, net="private") as running:
        result = running.wait_ready()
        assert "HTTP/1.0 200" in result.evidence or "HTTP/1.1 200" in result.evidence
        assert result.ready_at >= running.started_at
    assert running.process.returncode is not None

    with start(datasets.workload("busybox", "echo"), rootfs, run_dir) as running:
        result = running.wait_ready()
        assert "hello" in result.evidence
    assert not _mounted(run_dir)


def test_push_gives_the_local_digest(busybox: Path, cache: Path, tmp_path: Path) -> None:
    local = _index(busybox)["manifests"][0]["digest"]
    for kind in REGISTRIES:
        with start_registry(kind, tmp_path / kind) as url:
            host = url.removeprefix("http://")
            reference = f"{host}/bench/busybox:v1"
            assert datasets.push("busybox", reference, cache_dir=cache) == local
            assert datasets.push("busybox", reference, cache_dir=cache) == local  # again: no-op
            reply = httpx.get(
                f"{url}/v2/bench/busybox/manifests/v1", headers={"Accept": OCI_MANIFEST}
            )
            assert reply.status_code == 200
            assert reply.headers["docker-content-digest"] == local


@pytest.mark.slow
def test_containerd_pulls_and_runs_the_image(busybox: Path, cache: Path, tmp_path: Path) -> None:
    """A real runtime takes the image: ctr pulls it from the registry and runs its echo."""
    need(shutil.which("runc") is not None, "runc is not installed")
    with start_registry("embedded", tmp_path) as url, containerd_daemon(tmp_path) as ctr:
        reference = f"{url.removeprefix('http://')}/bench/busybox:v1"
        datasets.push("busybox", reference, cache_dir=cache)
        ctr.ctr("image", "pull", "--plain-http", reference)
        echo = datasets.workload("busybox", "echo")
        output = ctr.ctr("run", "--rm", reference, "workbench-echo", *echo.command)
    assert output.strip() == "hello"


def test_cli(busybox: Path, cache: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(dataset_command, ["list", "--cache-dir", str(cache)])
    assert listed.exit_code == 0, listed.output
    assert "busybox" in listed.output and "built" in listed.output

    path = runner.invoke(dataset_command, ["path", "busybox", "--cache-dir", str(cache)])
    assert path.output.strip() == str(busybox)
    missing = runner.invoke(dataset_command, ["path", "redis", "--cache-dir", str(cache / "x")])
    assert missing.exit_code != 0 and "is not built" in str(missing.exception)

    built = runner.invoke(dataset_command, ["build", "-q", "busybox", "--cache-dir", str(cache)])
    assert built.output.strip() == str(busybox)

    shown = runner.invoke(dataset_command, ["workload", "busybox", "--variant", "echo"])
    assert json.loads(shown.output)["ready"] == {"exit": 0, "output": "hello"}
