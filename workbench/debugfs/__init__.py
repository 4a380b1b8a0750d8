"""`workbench debugfs MOUNTPOINT`: a read-only file system of the live internals of every image.

See `workbench.debugfs.fs` for the layout (also in the README at the root of the view).
"""

from workbench.debugfs.fs import README_TEXT, DebugFs, serve

__all__ = ["README_TEXT", "DebugFs", "serve"]
