"""Recipe parsing: every shipped recipe, and bad recipes with the errors they get."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench import datasets
from workbench.datasets.recipe import DEFAULT_ENV, load_recipe, recipe_hash
from workbench.errors import RecipeError

SHIPPED = ["busybox", "debian", "nginx", "postgres", "python-numpy-pandas", "redis", "wordpress"]


def test_shipped_recipes_parse() -> None:
    assert set(SHIPPED) <= set(datasets.recipes())
    for name in SHIPPED:
        recipe = load_recipe(name)
        wl = recipe.workload
        assert wl.image == name and wl.command and wl.ready_means
        assert wl.env["PATH"] == DEFAULT_ENV["PATH"]
        if name not in ("busybox", "debian"):
            assert recipe.base == "debian"
            assert recipe.all_layers[0] == load_recipe("debian").all_layers[0]


def test_workloads_say_what_ready_means() -> None:
    kinds = {name: datasets.workload(name).probe.kind for name in SHIPPED}
    assert kinds == {
        "busybox": "http",
        "debian": "exit",
        "nginx": "http",
        "postgres": "log",
        "python-numpy-pandas": "output",
        "redis": "log",
        "wordpress": "http",
    }
    assert datasets.workload("wordpress").probe.path == "/wp-admin/install.php"
    assert datasets.workload("busybox", "echo").probe.kind == "exit"
    with pytest.raises(RecipeError, match="no workload variant 'nope'; it has \\['echo'\\]"):
        datasets.workload("busybox", "nope")


def _write(directory: Path, name: str, text: str) -> None:
    (directory / f"{name}.toml").write_text(text)


GOOD_WORKLOAD = """
[workload]
command = ["echo", "hello"]
ready = { exit = 0 }
ready_means = "it printed"
"""


def test_minimal_recipe_and_hash(tmp_path: Path) -> None:
    _write(tmp_path, "tiny", '[[layers]]\nfiles = [{ path = "/a", text = "x" }]\n' + GOOD_WORKLOAD)
    recipe = load_recipe("tiny", tmp_path)
    assert recipe.layers[0].files[0].text == "x"
    first = recipe_hash(recipe)

    _write(tmp_path, "tiny", '[[layers]]\nfiles = [{ path = "/a", text = "y" }]\n' + GOOD_WORKLOAD)
    assert recipe_hash(load_recipe("tiny", tmp_path)) != first


def test_source_file_content_is_hashed(tmp_path: Path) -> None:
    (tmp_path / "payload").write_text("one")
    text = '[[layers]]\nfiles = [{ path = "/p", source = "payload" }]\n' + GOOD_WORKLOAD
    _write(tmp_path, "src", text)
    first = recipe_hash(load_recipe("src", tmp_path))
    (tmp_path / "payload").write_text("two")
    assert recipe_hash(load_recipe("src", tmp_path)) != first


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("layers = [", "not valid TOML"),
        ("colour = 1\n" + GOOD_WORKLOAD, r"unknown key\(s\) \['colour'\]"),
        (GOOD_WORKLOAD, "no \\[\\[layers\\]\\] and no base"),
        ('[[layers]]\nrun = "true"\n', "no \\[workload\\]"),
        ('[[layers]]\ncomment = "x"\n' + GOOD_WORKLOAD, "an empty layer"),
        ('[[layers]]\napt = ["curl"]\n' + GOOD_WORKLOAD, "need a root file system"),
        (
            '[[layers]]\nrun = "true"\napt = ["a"]\npip = { packages = ["b"] }\n' + GOOD_WORKLOAD,
            "one of debootstrap, apt, pip",
        ),
        (
            '[[layers]]\nfiles = [{ path = "rel", text = "x" }]\n' + GOOD_WORKLOAD,
            "path must be absolute",
        ),
        (
            '[[layers]]\nfiles = [{ path = "/a/../b", text = "x" }]\n' + GOOD_WORKLOAD,
            "without '..'",
        ),
        (
            '[[layers]]\nfiles = [{ path = "/a", text = "x", dir = true }]\n' + GOOD_WORKLOAD,
            "exactly one of text, source, symlink, dir",
        ),
        (
            '[[layers]]\nfiles = [{ path = "/a", source = "missing" }]\n' + GOOD_WORKLOAD,
            "is not a file",
        ),
        (
            '[[layers]]\nfiles = [{ path = "/a", text = "x", mode = "644x" }]\n' + GOOD_WORKLOAD,
            "octal string",
        ),
        (
            '[[layers]]\nfiles = [{ path = "/a", text = "x", pakages = 1 }]\n' + GOOD_WORKLOAD,
            r"unknown key\(s\) \['pakages'\]",
        ),
        (
            'base = "debian"\n[[layers]]\napt = ["Bad Name"]\n' + GOOD_WORKLOAD,
            "not a Debian package name",
        ),
        ('base = "debian"\n[[layers]]\ndebootstrap = {}\n' + GOOD_WORKLOAD, "only a first layer"),
        (
            'base = "debian"\n[[layers]]\npip = { packages = [] }\n' + GOOD_WORKLOAD,
            "name at least one requirement",
        ),
        ('base = "nosuch"\n' + GOOD_WORKLOAD, "no recipe 'nosuch'"),
        ('[[layers]]\nrun = "true"\n[workload]\ncommand = []\n', "give the argv"),
        (
            '[[layers]]\nrun = "true"\n[workload]\ncommand = ["x"]\nready_means = "y"\n',
            "no ready probe",
        ),
        (
            '[[layers]]\nrun = "true"\n[workload]\ncommand = ["x"]\nready = { exit = 0 }\n',
            "ready_means missing",
        ),
        (
            '[[layers]]\nrun = "true"\n[workload]\ncommand = ["x"]\nports = [0]\n'
            'ready = { exit = 0 }\nready_means = "y"\n',
            "ports are 1..65535",
        ),
        (
            '[[layers]]\nrun = "true"\n[workload]\ncommand = ["x"]\nready = { log = 1 }\n'
            'ready_means = "y"\n',
            "non-empty string",
        ),
    ],
)
def test_bad_recipes(tmp_path: Path, text: str, message: str) -> None:
    _write(tmp_path, "bad", text)
    if "debian" in text:
        (tmp_path / "debian.toml").write_text((datasets.recipes_dir() / "debian.toml").read_text())
    with pytest.raises(RecipeError, match=message) as caught:
        load_recipe("bad", tmp_path)
    assert "bad.toml" in str(caught.value) or "nosuch" in str(caught.value)


def test_base_loop_and_bad_names(tmp_path: Path) -> None:
    _write(tmp_path, "a", 'base = "b"\n' + GOOD_WORKLOAD)
    _write(tmp_path, "b", 'base = "a"\n' + GOOD_WORKLOAD)
    with pytest.raises(RecipeError, match="base chain loops \\(a -> b -> a\\)"):
        load_recipe("a", tmp_path)
    with pytest.raises(RecipeError, match="lowercase letters"):
        load_recipe("Bad/Name", tmp_path)
    with pytest.raises(RecipeError, match="known recipes: a, b"):
        load_recipe("missing", tmp_path)
