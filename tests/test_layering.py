"""Imports point toward the core: core <- adapters <- runtime <- edges.

Checked on the source, so a layering slip fails CI instead of waiting for a
reviewer. A module may import its own layer or any layer below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "eplb_fsm"
# the edge layer: the reference model, the simulator, the CLI, engine integrations
EDGES = ("_reference", "_sim", "_cli", "_integrations", "testing")
RANK = {"_core": 0, "_adapters": 1, "_runtime": 2, **dict.fromkeys(EDGES, 3)}


def _layer(module_path: Path) -> int | None:
    parts = module_path.relative_to(PACKAGE).parts
    return RANK.get(parts[0]) if len(parts) > 1 else None


def _imported_layers(path: Path) -> set[str]:
    found = set()
    tree = ast.parse(path.read_text())
    depth_of_file = len(path.relative_to(PACKAGE).parts) - 1
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(path.relative_to(PACKAGE).parts[:depth_of_file])
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("eplb_fsm"):
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("eplb_fsm."):
                    found.add(alias.name.split(".")[1])
    return found


def test_imports_point_toward_the_core() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        layer = _layer(path)
        if layer is None:
            continue
        for target in _imported_layers(path):
            if target in RANK and RANK[target] > layer:
                violations.append(f"{path.relative_to(PACKAGE)} imports {target}")
            elif target not in RANK and not target.startswith("_") and target != "testing":
                # the public facade (eplb_fsm/__init__) sits above every layer
                violations.append(f"{path.relative_to(PACKAGE)} imports eplb_fsm.{target}")
    assert not violations, violations


def test_core_needs_no_torch_distributed_or_asyncio() -> None:
    for path in (PACKAGE / "_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                assert not name.startswith(("torch.distributed", "asyncio", "anyio")), (
                    f"{path.name} imports {name}"
                )


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, package_modules: set[str]) -> set[str]:
    """Modules of ours that `path` imports when it is imported (not inside functions)."""
    name = _module_name(path)
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.parse(path.read_text()).body:
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                module = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("eplb_fsm."):
                module = node.module.split(".")[1:]
            else:
                continue
            stem = ".".join(p for p in module if p)
            targets = [f"{stem}.{a.name}" if stem else a.name for a in node.names] + [stem]
        elif isinstance(node, ast.Import):
            targets = [a.name[len("eplb_fsm."):] for a in node.names
                       if a.name.startswith("eplb_fsm.")]
        found |= {t for t in targets if t in package_modules and t != name}
    return found


def test_no_module_level_import_cycles() -> None:
    """A module-level import circle makes import order matter; none may exist."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"}
    graph = {name: _top_level_imports(path, set(paths)) for name, path in paths.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt]
                raise AssertionError(" -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["_sim.simulate"] >= {"_sim.simulate_elastic", "_sim.serving"}
