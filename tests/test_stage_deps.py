"""dvc.yaml's deps cover every project module a stage runs, and stages are leaves: proved from the code with `ast`,
so the next missing dep or stage-to-stage import fails here, not on somebody else's machine."""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from conftest import ROOT

PACKAGES = ("pipeline.backbones",)  # imported by name at run time (`backbones.MODULES`): listed as a whole folder


def stages() -> dict[str, dict]:
    """{stage name: its dvc.yaml body} (a foreach stage by its `do`)."""
    return {name: s.get("do", s) for name, s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}


def stage_module(body: dict) -> str:
    """`bin/python -m pipeline.split ...` -> `pipeline.split`."""
    words = body["cmd"].split()
    return words[words.index("-m") + 1]


def module_file(module: str) -> Path:
    path = ROOT / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def direct_imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its code (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(module_file(module).read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] == "pipeline" and module_file(name).exists() and name != "pipeline":
                found.add(name)
    return found - {module}


def reachable(starts, edges) -> set[str]:
    """Every node reached from `starts` by following `edges(node)` (the starts themselves only when reached)."""
    seen, todo = set(), [n for s in starts for n in edges(s)]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += edges(n)
    return seen


def closure(module: str) -> set[str]:
    """Every project module that running `module` may import, transitively (packages in PACKAGES whole), with the
    `pipeline` package itself (its `__init__` runs first)."""
    def edges(m: str) -> list[str]:
        return [i for i in direct_imports(m) if not i.startswith(tuple(f"{p}." for p in PACKAGES))]

    return {module, "pipeline"} | reachable([module, "pipeline"], edges)


def dep_path(module: str) -> str:
    """The dvc.yaml dep that covers `module`."""
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package.replace(".", "/")
    return module_file(module).relative_to(ROOT).as_posix()


def test_every_stage_depends_on_every_module_it_imports():
    missing = {}
    for name, body in stages().items():
        deps = {d if isinstance(d, str) else next(iter(d)) for d in body["deps"]}
        needed = {dep_path(m) for m in closure(stage_module(body))}
        if needed - deps:
            missing[name] = sorted(needed - deps)
    assert not missing, f"dvc.yaml deps lack the modules these stages import: {missing}"


def test_no_stage_imports_another_stage():
    modules = {stage_module(b) for b in stages().values()}
    crossing = {m: sorted((closure(m) - {m}) & modules) for m in modules}
    assert not {m: c for m, c in crossing.items() if c}, f"stages import other stages: {crossing}"


def test_no_import_cycles():
    """No two modules import each other, directly or around a circle (a package, such as the backbones registry and
    its members, counts as one module)."""
    def unit(m: str) -> str:
        return next((p for p in PACKAGES if m == p or m.startswith(p + ".")), m)

    project = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in (ROOT / "pipeline").rglob("*.py")} - {"pipeline"}
    graph = {}
    for m in project:
        graph.setdefault(unit(m), set()).update(unit(i) for i in direct_imports(m) if i != "pipeline")
    for u in graph:
        graph[u].discard(u)
    cycles = sorted(u for u in graph if u in reachable([u], lambda n: graph.get(n, ())))
    assert not cycles, f"modules in an import cycle: {cycles}"


def test_the_checks_see_what_they_check():
    """The machinery itself: a stage's closure reaches the shared modules below it."""
    assert {"pipeline.heads", "pipeline.features", "pipeline.train", "pipeline.io"} <= closure("pipeline.bagging")
    assert "pipeline.images" in closure("pipeline.cache")
