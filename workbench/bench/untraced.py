"""Build a copy of a module with its tracing hooks removed, to measure what they cost.

Layers trace with one pattern (see `workbench.tracing.core`):

    recorder = trace.recorder
    if recorder is not None:
        ...

This module parses a module's source, deletes every such assignment and `if` block, and
executes the result as a new module. Benchmarks then time the same work through both modules
in one run: the difference is the real cost of tracing when it is off, not an estimate.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import types

__all__ = ["without_tracing"]


class _StripHooks(ast.NodeTransformer):
    def __init__(self) -> None:
        self.removed = 0

    def visit_Assign(self, node: ast.Assign) -> ast.AST | None:
        target = node.targets[0] if len(node.targets) == 1 else None
        reads_recorder = isinstance(node.value, ast.Attribute) and node.value.attr == "recorder"
        if isinstance(target, ast.Name) and target.id == "recorder" and reads_recorder:
            self.removed += 1
            return None
        return self.generic_visit(node)

    def visit_If(self, node: ast.If) -> ast.AST | list[ast.stmt] | None:
        # Look at the test before visiting it: visiting turns `recorder` into None.
        test = node.test
        is_hook = (
            isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id == "recorder"
            and isinstance(test.ops[0], ast.IsNot)
        )
        self.generic_visit(node)
        if is_hook:
            self.removed += 1
            return node.orelse or None
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        # What is left reads the recorder to pass it on (an argument): pass None instead.
        if node.id == "recorder" and isinstance(node.ctx, ast.Load):
            return ast.copy_location(ast.Constant(None), node)
        return node

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        # A body emptied by the stripping still needs one statement.
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and field == "body" and not body:
                body.append(ast.Pass())
        return node


def without_tracing(module_name: str, strip: bool = True) -> tuple[types.ModuleType, int]:
    """A fresh copy of `module_name` with the tracing hooks deleted, and how many went.

    With `strip=False` the copy keeps its hooks but is compiled and loaded the same way, so
    that a benchmark compares two copies that differ only in the hooks (a module loaded by
    `exec` can run a few percent apart from the imported original for reasons of memory
    layout alone).

    Raises `RuntimeError` if the stripped module still reads the tracing module's recorder
    (a hook of another shape), since timing it would then compare the wrong things.
    """
    original = importlib.import_module(module_name)
    tree = ast.parse(inspect.getsource(original))
    stripper = _StripHooks()
    if strip:
        tree = ast.fix_missing_locations(stripper.visit(tree))

    leftover = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "recorder"
    ]
    if strip and leftover:
        raise RuntimeError(
            f"{module_name}: tracing hooks of an unknown shape remain at lines {leftover}"
        )

    copy = types.ModuleType(f"{module_name}_{'untraced' if strip else 'copy'}")
    copy.__dict__["__file__"] = original.__file__
    sys.modules[copy.__name__] = copy
    exec(compile(tree, f"<{copy.__name__}>", "exec"), copy.__dict__)
    return copy, stripper.removed
