"""The packages of evotok_hf import each other one way only.

Every import in every module under src/evotok_hf is read with `ast` (module-level ones and those inside functions,
relative ones resolved), and each becomes an arrow between the two parts of the package it joins: a subpackage
(`modeling`, `training`, `evaluation`, ...) or a top-level module (`image_datasets`, `frozen_networks`, ...). Two
parts that reach each other through the arrows form a cycle: neither can be read, tested or moved without the other,
and a lazy import inside a function only hides the knot. The package root (`evotok_hf/__init__.py`, which imports
its parts to register them) is not a part.
"""

import ast
import pathlib

SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[1] / "src"
PACKAGE = "evotok_hf"


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package (a package is named by its `__init__.py`)."""
    modules = {}
    for path in sorted((SOURCE_ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SOURCE_ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_names(module: str, path: pathlib.Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The absolute dotted names an import statement may load: the module, and for `from x import y` also `x.y`
    (which is a submodule when y is one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _part(module: str) -> str | None:
    """The part of the package a module belongs to: `evotok_hf.<first name>`, or None for the root."""
    names = module.split(".")
    return ".".join(names[:2]) if len(names) > 1 else None


def import_arrows() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) -> the imports behind that arrow, as "module:line -> module"."""
    modules = _modules()
    arrows: dict[tuple[str, str], list[str]] = {}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = set()
            for name in _imported_names(module, path, node):
                while name and name not in modules:  # `from .x import some_function` -> the module .x
                    name = name.rpartition(".")[0]
                if name:
                    targets.add(name)
            for target in sorted(targets):
                source_part, target_part = _part(module), _part(target)
                if None not in (source_part, target_part) and source_part != target_part:
                    arrows.setdefault((source_part, target_part), []).append(f"{module}:{node.lineno} -> {target}")
    return arrows


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for following in graph.get(stack.pop(), ()):
            if following not in seen:
                seen.add(following)
                stack.append(following)
    return seen


def import_cycles(arrows: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The groups of parts that all reach each other (strongly connected, more than one part), sorted."""
    graph: dict[str, set[str]] = {}
    for source, target in arrows:
        graph.setdefault(source, set()).add(target)
    reach = {part: _reachable(graph, part) for part in graph}
    cycles = {frozenset({part} | {other for other in reach[part] if part in reach.get(other, ())}) for part in graph}
    return sorted(sorted(cycle) for cycle in cycles if len(cycle) > 1)


def test_the_reader_sees_relative_and_function_level_imports():
    arrows = import_arrows()
    # A module-level relative import of a sibling package: training/trainer.py's `from ..modeling import ...`.
    assert ("evotok_hf.training", "evotok_hf.modeling") in arrows
    # Imports inside functions count too: miniature/scoring.py imports evaluation only inside its functions.
    assert ("evotok_hf.miniature", "evotok_hf.evaluation") in arrows


def test_the_cycle_finder_finds_a_cycle_through_three_parts():
    arrows = {("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): [], ("d", "e"): [], ("e", "d"): []}
    assert import_cycles(arrows) == [["a", "b", "c"], ["d", "e"]]
    assert import_cycles({("a", "b"): [], ("b", "c"): []}) == []


def test_no_import_cycle_between_packages():
    arrows = import_arrows()
    cycles = import_cycles(arrows)
    explained = []
    for cycle in cycles:
        explained.append(" <-> ".join(cycle))
        explained += [f"    {line}" for (source, target), lines in sorted(arrows.items())
                      if source in cycle and target in cycle for line in lines]  # fmt: skip
    assert not cycles, "import cycles between parts of evotok_hf:\n" + "\n".join(explained)
