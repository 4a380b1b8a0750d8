"""Images: LSMT layers (read-only and writable), commit, and the merged multi-layer view."""
