"""Image conversion with real mounts: OCI images built here -> OverlayBD images, checked.

Needs root, /dev/fuse, losetup, mkfs.ext4, debugfs, e2fsck; skips without them unless CI is
set. Every test converts under its own run folder and checks afterwards that no mount, loop
device or FUSE server of it is left.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from images import (
    Entry,
    SourceImage,
    base_layer,
    digest,
    layer_tar,
    make_image,
    pattern,
    sparse_member,
    standard_image,
    write_layout,
)
from registries import DOCKER_MEDIA_TYPES, push_blob, push_image, start_registry

if importlib.util.find_spec("pyfuse3") is None:
    if os.environ.get("CI"):
        raise RuntimeError("pyfuse3 is not installed; CI must run the conversion tests")
    pytest.skip("pyfuse3 is not installed (needs libfuse3-dev)", allow_module_level=True)

from workbench.cli import cli
from workbench.convert import convert_image, verify_image
from workbench.device.mount import list_mounts, mount_image, unmount, unmount_all
from workbench.errors import DigestMismatchError, LayerError, UnsupportedFormatError
from workbench.registry.client import OCI_MANIFEST

TOOLS = ("losetup", "mkfs.ext4", "debugfs", "e2fsck", "fusermount3")


def require_mounts() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "conversion needs root (mounts, chroot, mknod)"
    elif not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse is missing"
    elif missing := [tool for tool in TOOLS if shutil.which(tool) is None]:
        reason = f"{', '.join(missing)} missing; install Debian's fuse3, e2fsprogs, util-linux"
    if reason is None:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason}; CI must run the conversion tests")
    pytest.skip(reason)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """The device layer's run folder; checked empty of mounts, loops and servers afterwards."""
    require_mounts()
    run = tmp_path / "run"
    try:
        yield run
    finally:
        left = [mount.mountpoint for mount in list_mounts(run)]
        unmount_all(run)
        mounted = [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(tmp_path))
        ]
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        left += mounted + [line for line in loops.splitlines() if str(run) in line]
        assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with start_registry("embedded", tmp_path_factory.mktemp("registry")) as url:
        yield url


def push_source(url: str, repo: str, tag: str, image: SourceImage) -> str:
    """Push the image's blobs, config and manifest; returns ``host:port/repo:tag``."""
    for blob in image.blobs:
        push_blob(url, repo, blob)
    config = json.dumps(image.config).encode()
    push_blob(url, repo, config)
    manifest = json.dumps(image.manifest(digest(config), len(config))).encode()
    reply = httpx.put(
        f"{url}/v2/{repo}/manifests/{tag}",
        content=manifest,
        headers={"content-type": OCI_MANIFEST},
    )
    assert reply.status_code == 201, reply.text
    return f"{url.removeprefix('http://')}/{repo}:{tag}"


def convert(source: str, destination: str, tmp_path: Path, run: Path, **options):
    return convert_image(
        source, destination, workdir=tmp_path / "work", run_dir=run, sizes=False, **options
    )


# ---------------------------------------------------------------------------------------------
# The result, file by file


@pytest.mark.slow
def test_converted_image_has_every_entry_with_oci_semantics(
    registry: str, run_dir: Path, tmp_path: Path
) -> None:
    source = push_source(registry, "lib/app", "v1", standard_image())
    target = source.replace(":v1", ":v1-obd")
    report = convert_image(source, target, run_dir=run_dir, workdir=tmp_path / "work")

    # Sizes of every form, and the manifest in the registry.
    assert [layer.tar for layer in report.layers] == [
        len(layer_tar(base_layer())),
        report.layers[1].tar,
    ]
    for layer in report.layers:
        assert layer.tar_gz and layer.lsmt and layer.zfile_lz4 and layer.zfile_zstd
        assert layer.size > layer.zfile_lz4 > 0
    manifest = httpx.get(
        f"{registry}/v2/lib/app/manifests/v1-obd", headers={"accept": OCI_MANIFEST}
    ).json()
    assert digest(json.dumps(manifest, indent=2).encode()) == report.manifest_digest
    annotations = manifest["layers"][0]["annotations"]
    assert annotations["containerd.io/snapshot/overlaybd/blob-digest"] == report.layers[0].digest
    assert annotations["containerd.io/snapshot/overlaybd/blob-fs-type"] == "ext4"
    config = httpx.get(f"{registry}/v2/lib/app/blobs/{manifest['config']['digest']}").json()
    assert config["config"]["Env"] == ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]
    assert [entry["created_by"] for entry in config["history"]] == ["layer 0", "layer 1"]

    # Mount it lazily from the registry and look.
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount_image(target, mountpoint, run_dir=run_dir, cache_dir=tmp_path / "cache")
    try:
        root = mountpoint
        assert (root / "etc/passwd").read_bytes().endswith(b"user:x:1000:1000::/home/user:\n")
        assert not (root / "var/cache/junk").exists() and (root / "var/cache").is_dir()
        assert not (root / "var/log").exists()
        assert sorted(os.listdir(root / "opt/app")) == ["config"]
        assert (root / "opt/app/config").read_bytes() == b"new"
        assert oct((root / "opt/app").stat().st_mode & 0o7777) == "0o750"
        assert (root / "home/user/notes.txt").is_dir()
        assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/UTC"
        assert os.readlink(root / "usr/share/zoneinfo/UTC") == "Etc/UTC"
        assert (root / "usr/bin/sudo").stat().st_ino == (root / "usr/bin/sudoedit").stat().st_ino
        assert (root / "usr/bin/ping").stat().st_ino == (root / "usr/bin/ping.hard").stat().st_ino
        assert (root / "usr/bin/sudo").read_bytes() == pattern(70_000, 1)
        assert (root / "usr/bin/sudo").stat().st_mode & 0o7777 == 0o4755
        assert not (root / "srv/shared").exists()
        assert (root / "srv/shared-link").read_bytes() == b"shared inode"
        assert (root / "srv/shared-link").stat().st_nlink == 1
        null = (root / "dev/null").lstat()
        assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
        loop = (root / "dev/loop9").lstat()
        assert (os.major(loop.st_rdev), os.minor(loop.st_rdev), loop.st_gid) == (7, 9, 6)
        assert oct((root / "run/fifo").lstat().st_mode) == "0o10620"
        assert oct((root / "tmp").stat().st_mode & 0o7777) == "0o1777"
        shadow = (root / "etc/shadow").stat()
        assert (shadow.st_uid, shadow.st_gid, shadow.st_mode & 0o777) == (0, 42, 0o640)
        assert os.getxattr(root / "usr/bin/ping", "security.capability")[:4] == b"\x01\x00\x00\x02"
        assert (root / "home/user/big.bin").read_bytes() == pattern(3 << 20, 3)
        zeros = root / "home/user/zeros.bin"
        assert zeros.stat().st_size == 2 << 20 and zeros.read_bytes() == bytes(2 << 20)
        assert (root / "home/user/empty").stat().st_uid == 1000
        assert (root / ("a/" + "long-name-" * 12 + "end")).read_bytes().startswith(b"a long")
        assert (root / "usr/bin/sudo").stat().st_mtime_ns == 1_700_000_000 * 10**9
    finally:
        unmount(mountpoint, run_dir)

    # And the round trip through verify finds nothing.
    result = verify_image(source, target, run_dir=run_dir, workdir=tmp_path / "verify")
    assert result.ok, [str(d) for d in result.differences]
    assert result.paths > 30


@pytest.mark.slow
def test_verify_reports_differences(registry: str, run_dir: Path, tmp_path: Path) -> None:
    image = standard_image()
    source = push_source(registry, "lib/diff", "v1", image)
    changed = make_image([layer_tar([*base_layer(), Entry("etc/extra", data=b"x")])])
    other = push_source(registry, "lib/diff", "other", changed)
    target = other.replace(":other", ":other-obd")
    convert(other, target, tmp_path, run_dir)

    result = verify_image(source, target, run_dir=run_dir, workdir=tmp_path / "verify")
    what = {(d.path, d.what) for d in result.differences}
    assert ("etc/extra", "presence") in what
    assert ("etc/passwd", "sha256") in what
    assert ("opt/app/lib", "presence") in what


@pytest.mark.slow
def test_conversion_is_reproducible(registry: str, run_dir: Path, tmp_path: Path) -> None:
    source = push_source(registry, "lib/repro", "v1", standard_image())
    first = convert(source, source.replace(":v1", ":a"), tmp_path / "a", run_dir)
    second = convert(source, source.replace(":v1", ":b"), tmp_path / "b", run_dir)
    assert [layer.digest for layer in first.layers] == [layer.digest for layer in second.layers]
    assert first.manifest_digest == second.manifest_digest
    assert first.layers[0].uuid != first.layers[1].uuid


@pytest.mark.slow
def test_oci_layout_to_oci_layout_with_zstd(run_dir: Path, tmp_path: Path) -> None:
    source = write_layout(standard_image(), tmp_path / "src")
    report = convert(source, f"oci:{tmp_path / 'dst'}:obd", tmp_path, run_dir, algorithm="zstd")
    index = json.loads((tmp_path / "dst" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == report.manifest_digest
    for layer in report.layers:
        blob = tmp_path / "dst" / "blobs" / "sha256" / layer.digest.partition(":")[2]
        assert blob.stat().st_size == layer.size

    result = verify_image(source, f"oci:{tmp_path / 'dst'}:obd", run_dir=run_dir)
    assert result.ok, [str(d) for d in result.differences]


@pytest.mark.slow
def test_docker_registry_source_and_destination(run_dir: Path, tmp_path: Path) -> None:
    with start_registry("docker-registry", tmp_path) as url:
        source = push_source(url, "lib/app", "v1", standard_image())
        target = source.replace(":v1", ":obd")
        convert(source, target, tmp_path, run_dir)
        result = verify_image(source, target, run_dir=run_dir, workdir=tmp_path / "verify")
    assert result.ok, [str(d) for d in result.differences]


def test_cli_convert_prints_the_size_table(run_dir: Path, tmp_path: Path) -> None:
    source = write_layout(make_image([layer_tar(base_layer())], [True]), tmp_path / "src")
    os.environ["WORKBENCH_RUN_DIR"] = str(run_dir)
    try:
        result = CliRunner().invoke(
            cli, ["convert", source, f"oci:{tmp_path / 'dst'}:v1", "--no-progress"]
        )
        verified = CliRunner().invoke(cli, ["verify", source, f"oci:{tmp_path / 'dst'}:v1"])
    finally:
        del os.environ["WORKBENCH_RUN_DIR"]
    assert result.exit_code == 0, result.output
    assert "ZFile lz4" in result.output and "total" in result.output
    assert verified.exit_code == 0, verified.output
    assert "no differences" in verified.output


# ---------------------------------------------------------------------------------------------
# Bad input


def test_dotdot_escape_is_refused_and_nothing_written_outside(
    run_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-target"
    escape = layer_tar([Entry("etc/", tarfile.DIRTYPE), Entry(f"../../../..{outside}")])
    source = write_layout(make_image([escape]), tmp_path / "src")
    with pytest.raises(LayerError, match=r"escapes the image root with '\.\.'"):
        convert(source, f"oci:{tmp_path / 'dst'}", tmp_path, run_dir)
    assert not outside.exists()


def test_absolute_symlinks_resolve_inside_the_image(run_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "host-dir"
    outside.mkdir()
    tars = [
        layer_tar([Entry("escape", tarfile.SYMTYPE, linkname=str(outside))]),
        layer_tar(
            [
                Entry("escape/pwned", data=b"inside"),
                Entry("hard", tarfile.LNKTYPE, linkname="escape/pwned"),
            ]
        ),
    ]
    source = write_layout(make_image(tars), tmp_path / "src")
    convert(source, f"oci:{tmp_path / 'dst'}:v1", tmp_path, run_dir)
    assert list(outside.iterdir()) == []

    result = verify_image(source, f"oci:{tmp_path / 'dst'}:v1", run_dir=run_dir)
    assert result.ok, [str(d) for d in result.differences]
    assert list(outside.iterdir()) == []


def test_corrupt_gzip_is_a_clear_error(run_dir: Path, tmp_path: Path) -> None:
    good = gzip.compress(layer_tar(base_layer()), mtime=0)
    corrupt = good[: len(good) // 2] + bytes(b ^ 0x55 for b in good[len(good) // 2 : -100])
    image = make_image([layer_tar(base_layer())], [True])
    image.blobs = [corrupt]
    source = write_layout(image, tmp_path / "src")
    with pytest.raises(LayerError, match="corrupt or truncated"):
        convert(source, f"oci:{tmp_path / 'dst'}", tmp_path, run_dir)


def test_truncated_tar_is_caught_by_its_diff_id(run_dir: Path, tmp_path: Path) -> None:
    whole = layer_tar(base_layer())
    image = make_image([whole])
    cut = whole[: 512 * 40]
    image.blobs = [cut]
    source = write_layout(image, tmp_path / "src")
    with pytest.raises(LayerError, match="truncated"):
        convert(source, f"oci:{tmp_path / 'dst'}", tmp_path, run_dir)


def test_corrupt_header_does_not_end_the_layer_silently(run_dir: Path, tmp_path: Path) -> None:
    whole = bytearray(layer_tar(base_layer()))
    position = whole.index(b"usr/bin/sudo\0")  # a later header: break its checksum
    header = position - position % 512
    whole[header + 148 : header + 156] = b"0000000\0"
    image = make_image([bytes(whole)])
    source = write_layout(image, tmp_path / "src")
    with pytest.raises(LayerError, match=r"data after its end|corrupt"):
        convert(source, f"oci:{tmp_path / 'dst'}", tmp_path, run_dir)


def test_digest_mismatch_of_a_layout_blob(run_dir: Path, tmp_path: Path) -> None:
    source = write_layout(make_image([layer_tar(base_layer())]), tmp_path / "src")
    blob = next(p for p in (tmp_path / "src/blobs/sha256").iterdir() if p.stat().st_size > 5000)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\1")
    with pytest.raises(DigestMismatchError, match="corrupt or truncated"):
        convert(source, f"oci:{tmp_path / 'dst'}", tmp_path, run_dir)


def test_unknown_media_type_is_refused(run_dir: Path, tmp_path: Path) -> None:
    image = make_image([layer_tar(base_layer())])
    image.media_types = ["application/vnd.oci.image.layer.v1.tar+bzip2"]
    source = write_layout(image, tmp_path / "src")
    with pytest.raises(UnsupportedFormatError, match=r"tar\+bzip2.*supported: "):
        convert(source, f"oci:{tmp_path / 'dst'}", tmp_path, run_dir)


@pytest.mark.slow
def test_huge_sparse_file_and_zstd_layer(run_dir: Path, tmp_path: Path) -> None:
    import zstandard

    size, data, at = 8 << 30, pattern(4096, 7), 1 << 30
    member = sparse_member("var/lib/huge.img", size, data, at)
    tar = member + bytes(1024)
    tar += bytes(-len(tar) % 10240)
    blob = zstandard.ZstdCompressor().compress(tar)
    image = make_image([tar])
    image.blobs, image.media_types = [blob], ["application/vnd.oci.image.layer.v1.tar+zstd"]
    source = write_layout(image, tmp_path / "src")
    report = convert(source, f"oci:{tmp_path / 'dst'}:v1", tmp_path, run_dir)
    assert report.layers[0].tar == len(tar)
    assert report.layers[0].lsmt < 64 << 20  # the holes stay holes

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    from workbench.convert.verify import _converted_config
    from workbench.registry.session import RegistrySession

    with RegistrySession(use_cache=False) as session:
        config = _converted_config(f"oci:{tmp_path / 'dst'}:v1", tmp_path, session, "linux/amd64")
    mount_image(config, mountpoint, run_dir=run_dir)
    try:
        huge = mountpoint / "var/lib/huge.img"
        assert huge.stat().st_size == size
        with huge.open("rb") as file:
            file.seek(at)
            assert file.read(4096) == data
            file.seek(at - 4096)
            assert file.read(4096) == bytes(4096)
        assert huge.stat().st_blocks * 512 <= 1 << 20  # one 1 MiB chunk holds the data
    finally:
        unmount(mountpoint, run_dir)


def test_layer_larger_than_the_disk(run_dir: Path, tmp_path: Path) -> None:
    source = write_layout(
        make_image([layer_tar([Entry("big", data=pattern(24 << 20, 5))])]), tmp_path / "src"
    )
    with pytest.raises(LayerError, match=r"disk is full.*--vsize"):
        convert(source, f"oci:{tmp_path / 'dst'}", tmp_path, run_dir, vsize=16 << 20)


@pytest.mark.slow
def test_bench_convert_prints_the_ratio(run_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", "convert", "--layers", "1", "--layer-mb", "2"])
    assert result.exit_code == 0, result.output
    assert "tar -xzf onto ext4" in result.output
    assert "ratio convert / tar -x: " in result.output


def test_docker_schema2_image(registry: str, run_dir: Path, tmp_path: Path) -> None:
    tar = layer_tar(base_layer())
    config = make_image([tar], [True]).config
    push_image(
        registry,
        "lib/docker",
        "v1",
        [gzip.compress(tar, mtime=0)],
        config,
        media_types=DOCKER_MEDIA_TYPES,
    )
    source = f"{registry.removeprefix('http://')}/lib/docker:v1"
    report = convert(source, f"oci:{tmp_path / 'dst'}:v1", tmp_path, run_dir)
    assert report.layers[0].media_type == DOCKER_MEDIA_TYPES[2]
    assert report.layers[0].diff_id == digest(tar)
    result = verify_image(source, f"oci:{tmp_path / 'dst'}:v1", run_dir=run_dir)
    assert result.ok, [str(d) for d in result.differences]


def test_umoci_built_image_matches_umoci_unpack(run_dir: Path, tmp_path: Path) -> None:
    """An image built by umoci (its own whiteouts), converted, equals umoci's own unpack."""
    if shutil.which("umoci") is None:
        if os.environ.get("CI"):
            raise RuntimeError("umoci is not installed; CI must test against it")
        pytest.skip("umoci is not installed (apt-get install umoci)")

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True, cwd=tmp_path)

    umoci("init", "--layout", "img")
    umoci("new", "--image", "img:base")
    umoci("unpack", "--image", "img:base", "bundle")
    rootfs = tmp_path / "bundle" / "rootfs"
    (rootfs / "etc/app").mkdir(parents=True)
    (rootfs / "etc/app/a").write_text("a")
    (rootfs / "etc/gone").write_text("gone")
    (rootfs / "etc/link").symlink_to("/etc/app/a")
    os.link(rootfs / "etc/app/a", rootfs / "etc/hard")
    os.mkfifo(rootfs / "fifo")
    os.setxattr(rootfs / "etc/app/a", "user.note", b"umoci")
    umoci("repack", "--image", "img:v1", "bundle")
    umoci("unpack", "--image", "img:v1", "bundle2")
    rootfs = tmp_path / "bundle2" / "rootfs"
    (rootfs / "etc/gone").unlink()
    shutil.rmtree(rootfs / "etc/app")
    (rootfs / "etc/app").mkdir()
    (rootfs / "etc/app/b").write_text("b")
    umoci("repack", "--image", "img:v2", "bundle2")
    umoci("unpack", "--image", "img:v2", "expected")

    source = f"oci:{tmp_path / 'img'}:v2"
    report = convert(source, f"oci:{tmp_path / 'dst'}:v2", tmp_path, run_dir)
    assert len(report.layers) == 2

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    from workbench.convert.verify import _converted_config, compare_trees, walk_tree
    from workbench.registry.session import RegistrySession

    with RegistrySession(use_cache=False) as session:
        config = _converted_config(f"oci:{tmp_path / 'dst'}:v2", tmp_path, session, "linux/amd64")
    mount_image(config, mountpoint, run_dir=run_dir)
    try:
        actual = walk_tree(mountpoint)
    finally:
        unmount(mountpoint, run_dir)
    expected = walk_tree(tmp_path / "expected" / "rootfs")
    actual.pop("lost+found", None)
    for tree in (expected, actual):
        tree.pop("")  # the root: umoci's bundle folder vs the file system's root
    differences = [str(d) for d in compare_trees(expected, actual)]
    assert not differences
    assert "etc/gone" not in actual and "etc/app/a" not in actual and "etc/app/b" in actual
