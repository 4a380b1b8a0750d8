"""DADI workbench: OverlayBD's block-level container images, rebuilt in Python and observable.

The read path is a chain of random-access files (see `workbench.blobs.common`):

    image (merged LSMT stack + writable layer) -> LSMT layer -> ZFile -> tar payload -> blob

`workbench.formats` holds the on-disk formats, `workbench.image` the layer stack,
`workbench.tracing` the event model every layer reports to, and `workbench.cli` the command.
"""

__version__ = "0.1.0"
