"""`workbench snapshotter serve` and `workbench rpull`: the containerd proxy snapshotter."""

from __future__ import annotations

import logging
import os

import click

from workbench.errors import WorkbenchError


@click.group("snapshotter")
def snapshotter() -> None:
    """A containerd proxy snapshotter: overlayfs layers and lazily read OverlayBD images."""


@snapshotter.command("serve")
@click.option(
    "--root",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder of the snapshots, their metadata and devices (made if missing).",
)
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Unix socket to serve on (containerd's proxy_plugins address).",
)
@click.option("--metrics", "metrics_address", help="[HOST:]PORT of a Prometheus endpoint.")
@click.option(
    "--insecure",
    multiple=True,
    help="Registry host to read over plain HTTP (loopback hosts always are); repeatable.",
)
@click.option(
    "--writable",
    "writable_mode",
    type=click.Choice(["overlayfs", "dir"]),
    default="overlayfs",
    show_default=True,
    help="Default rwMode of containers on OverlayBD images (label overlaybd.writable wins).",
)
@click.option(
    "--keep-devices",
    is_flag=True,
    help="Keep an image's device when its last container goes (no autoRemoveDev).",
)
def serve(
    root: str,
    socket_path: str,
    metrics_address: str | None,
    insecure: tuple[str, ...],
    writable_mode: str,
    keep_devices: bool,
) -> None:
    """Serve containerd's snapshots API on SOCKET until SIGTERM or SIGINT.

    Ordinary layers become overlayfs snapshots, as containerd's own snapshotter makes them.
    Layers of OverlayBD images pulled with `workbench rpull` stay in the registry; a
    container on them gets the image's device (read lazily through the block cache) as its
    overlay's lower layer. State lives under ROOT and survives a restart; devices stay
    mounted while the snapshotter is down.
    """
    from workbench.snapshotter.server import SnapshotterServer
    from workbench.snapshotter.service import Snapshotter

    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.getLogger("workbench").setLevel(logging.INFO)
    service = Snapshotter(
        root, insecure=insecure, writable_mode=writable_mode, auto_remove=not keep_devices
    )
    server = SnapshotterServer(service, socket_path, metrics_address).start()
    click.echo(f"serving on {os.path.abspath(socket_path)}", err=True)
    server.serve_forever()


@click.command("rpull")
@click.argument("reference")
@click.option(
    "--address",
    "-a",
    default="/run/containerd/containerd.sock",
    show_default=True,
    help="containerd's socket.",
)
@click.option("--namespace", "-n", default="default", show_default=True)
@click.option(
    "--snapshotter",
    "snapshotter_name",
    default="workbench",
    show_default=True,
    help="The proxy_plugins name of the workbench snapshotter in containerd's config.",
)
@click.option("--platform", default="linux/amd64", show_default=True)
@click.option("--insecure", multiple=True, help="Registry host to reach over plain HTTP.")
def rpull(
    reference: str,
    address: str,
    namespace: str,
    snapshotter_name: str,
    platform: str,
    insecure: tuple[str, ...],
) -> None:
    """Pull REFERENCE's manifest and config into containerd, layers left in the registry.

    As accelerated-container-image's `ctr rpull`: OverlayBD layers become remote snapshots
    of the workbench snapshotter (nothing is downloaded); ordinary layers are fetched and
    unpacked. Afterwards `ctr run --snapshotter NAME REFERENCE ...` starts containers.
    """
    import grpc

    from workbench.registry.session import RegistrySession
    from workbench.snapshotter.client import ContainerdClient
    from workbench.snapshotter.rpull import rpull as pull

    try:
        with (
            ContainerdClient(address, namespace) as client,
            RegistrySession(use_cache=False, insecure=insecure) as session,
        ):
            pulled = pull(reference, client, snapshotter_name, session, platform)
    except grpc.RpcError as exc:
        raise WorkbenchError(
            f"containerd at {address} refused: {exc.code().name}: {exc.details()}"
        ) from exc
    click.echo(
        f"{pulled.name} {pulled.manifest_digest}: {pulled.remote_layers} remote, "
        f"{pulled.unpacked_layers} unpacked, {pulled.present_layers} present layers"
    )
