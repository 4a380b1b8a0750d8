"""What is this file? Describe any file of an OverlayBD image, layer by layer.

`describe(path)` peels the wrappings the way a reader does (tar, then ZFile) and describes each
one and the LSMT file inside: header fields, decoded flags, index statistics. It also knows the
writable layer's index file and `config.v1.json`. The result is a plain dict, so that the CLI
prints it as text or JSON and a notebook can show it as it likes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from workbench.blobs import LocalFile, RandomAccessFile
from workbench.formats import lsmt
from workbench.formats.detect import unwrap
from workbench.formats.lsmt import LsmtHeader, SegmentIndex

__all__ = ["describe", "render_text"]


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A description of the file at `path`: one entry per wrapping, then the content."""
    path = os.fspath(path)
    with open(path, "rb") as probe:
        head = probe.read(1)
    if head == b"{":
        return _describe_config(path)

    with unwrap(LocalFile(path)) as unwrapped:
        layers = [_describe_wrapping(kind, getattr(unwrapped, kind)) for kind in unwrapped.layers]
        layers.append(_describe_content(unwrapped.file))
    return {"path": path, "size": os.path.getsize(path), "layers": layers}


def _flag_names(flags: int, names: dict[int, str]) -> list[str]:
    return [name for bit, name in names.items() if flags & bit]


_LSMT_FLAGS = {
    lsmt.FLAG_HEADER: "header",
    lsmt.FLAG_DATA: "data",
    lsmt.FLAG_SEALED: "sealed",
    lsmt.FLAG_SPARSE: "sparse",
}


def _describe_wrapping(kind: str, obj: Any) -> dict[str, Any]:
    if kind == "tar":
        return {
            "kind": "tar",
            "member": obj.entry_name,
            "payload_offset": obj.offset,
            "pax": obj.saw_pax,
            "payload_size": obj.size,
        }
    if kind == "zfile":
        header = obj.header
        stored = obj.source.size
        return {
            "kind": "zfile",
            "algorithm": obj.algorithm,
            "block_size": obj.block_size,
            "blocks": obj.block_count,
            "verify": obj.verify,
            "flags": f"{header.flags:#04x}",
            "overwrite_header": header.is_overwritten,
            "original_size": obj.size,
            "compressed_size": stored,
            "ratio": round(obj.size / stored, 3) if stored else None,
            "index_offset": header.index_offset,
        }
    return {"kind": kind}


def _describe_content(file: RandomAccessFile) -> dict[str, Any]:
    head = file.pread(0, lsmt.HT_SPACE)
    if not lsmt.is_lsmt(head):
        return {"kind": "raw", "size": file.size}

    header = LsmtHeader.unpack(head, file.name)
    description = _describe_header(header)
    if not header.is_data_file:
        entries = (file.size - header.index_offset) // 16
        description["kind"] = "lsmt writable index file"
        description["entries"] = entries
        return description

    description["kind"] = "lsmt data file"
    if file.size >= 2 * lsmt.HT_SPACE:
        tail = file.pread(file.size - lsmt.HT_SPACE, lsmt.HT_SPACE)
        if lsmt.is_lsmt(tail):
            trailer = LsmtHeader.unpack(tail, file.name, file.size - lsmt.HT_SPACE)
            if trailer.is_sealed and not trailer.is_header:
                kind = "committed" if header.is_sealed else "sealed writable"
                description["kind"] = f"lsmt {kind} layer"
                description["trailer"] = _describe_header(trailer)
                raw = file.pread(trailer.index_offset, trailer.index_size * 16)
                description["index"] = _describe_index(SegmentIndex.from_bytes(raw))
                description["index"]["padding_entries"] = trailer.index_size - len(
                    SegmentIndex.from_bytes(raw)
                )
    if "index" not in description:
        description["kind"] = (
            "lsmt writable data file (sparse)" if header.is_sparse else ("lsmt writable data file")
        )
        description["data_bytes"] = file.size - lsmt.HT_SPACE
    return description


def _describe_header(header: LsmtHeader) -> dict[str, Any]:
    return {
        "flags": f"{header.flags:#04x} ({', '.join(_flag_names(header.flags, _LSMT_FLAGS))})",
        "virtual_size": header.virtual_size,
        "uuid": header.uuid,
        "parent_uuid": header.parent_uuid,
        "message": header.message,
        "index_offset": header.index_offset,
        "index_size": header.index_size,
        "version": f"{header.version}.{header.sub_version}",
    }


def _describe_index(index: SegmentIndex) -> dict[str, Any]:
    if len(index) == 0:
        return {"entries": 0}
    length = index.length.astype(np.int64)
    zeroed = index.zeroed
    return {
        "entries": len(index),
        "mapped_bytes": int(length[~zeroed].sum()) * lsmt.ALIGNMENT,
        "zeroed_bytes": int(length[zeroed].sum()) * lsmt.ALIGNMENT,
        "zeroed_entries": int(zeroed.sum()),
        "first_offset": int(index.offset[0]) * lsmt.ALIGNMENT,
        "end_offset": int(index.end[-1]) * lsmt.ALIGNMENT,
        "longest_segment_bytes": int(length.max()) * lsmt.ALIGNMENT,
    }


def _describe_config(path: str) -> dict[str, Any]:
    from workbench.formats.config import ImageConfig

    config = ImageConfig.load(path)
    return {
        "path": path,
        "size": os.path.getsize(path),
        "layers": [
            {
                "kind": "image config (config.v1.json)",
                "lowers": [lower.to_json() for lower in config.lowers],
                "upper": config.upper.to_json(),
                "result_file": config.result_file,
            }
        ],
    }


def render_text(description: dict[str, Any]) -> str:
    """Human-readable lines: one block per wrapping, outermost first."""
    lines = [f"{description['path']}  ({description['size']:,} bytes)"]
    for depth, layer in enumerate(description["layers"]):
        indent = "  " * depth
        lines.append(f"{indent}{layer['kind']}")
        for key, value in layer.items():
            if key == "kind":
                continue
            if isinstance(value, dict | list):
                value = json.dumps(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                value = f"{value:,}"
            lines.append(f"{indent}  {key:<18} {value}")
    return "\n".join(lines)
