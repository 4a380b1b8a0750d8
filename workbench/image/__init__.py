"""Images: LSMT layers (read-only and writable), commit, and the merged multi-layer view.

ReadOnlyLayer   a committed or sealed layer file, plain or inside ZFile and tar (layer.py)
WritableLayer   the append-only data + index pair that takes new writes (writable.py)
commit_writable / import_raw / compact
                writable layer or raw disk -> sealed read-only layer (commit.py)
merge_indexes   the merged index of a stack: topmost mapping wins (merge.py)
LayerStack      the stack as one disk, reads and writes (stack.py)
open_image      the stack a config.v1.json describes (open.py)
"""

from workbench.image.commit import commit_writable, compact, import_raw
from workbench.image.layer import ReadOnlyLayer
from workbench.image.merge import merge_indexes
from workbench.image.open import open_image
from workbench.image.stack import LayerStack
from workbench.image.writable import WritableLayer

__all__ = [
    "LayerStack",
    "ReadOnlyLayer",
    "WritableLayer",
    "commit_writable",
    "compact",
    "import_raw",
    "merge_indexes",
    "open_image",
]
