"""A containerd proxy snapshotter for ordinary and OverlayBD images (issue 6).

The pieces, top down:

    server.py    containerd's snapshots API on a unix socket (grpcio), error codes, metrics
    service.py   `Snapshotter`: snapshot semantics, overlayfs mounts, remote OverlayBD layers
    devices.py   `DeviceManager`: an image's block layers attached lazily, shared, removed
    store.py     `MetadataStore`: snapshots and devices in SQLite under the root folder
    filters.py   containerd's filter syntax for List
    protos.py    containerd's .proto files (Debian's package), compiled on first use
    client.py    a containerd client (content, images, leases, snapshots, diff)
    rpull.py     `rpull`: metadata into containerd, OverlayBD layers left in the registry

`python -m workbench.snapshotter --root DIR --socket PATH` (or `workbench snapshotter
serve`) runs it; README.md has the containerd config that plugs it in.
"""
