"""The tree's structure, computed from the source: no import cycle among psr_ray modules, no import from a lower
layer into a higher one, no module over 400 lines, every package and top-level module in the README's Layout,
and bench/ imports of tests/ only its shared scenarios (tests never import bench)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "psr_ray"
MAX_LINES = 400
# The layers, bottom up: a module imports only its own layer and the ones below it. `runtime` (infrastructure)
# may be imported from anywhere and itself imports only core, config and runtime. `testing` (tiny fixtures) is
# imported by no product module.
LAYERS = {
    "core": 0, "config": 0, "runtime": 0,
    "data": 1,
    "engines": 2, "search": 2, "oracle": 2, "trainer": 2, "weight_sync": 2, "init_data": 2,
    "pipeline": 3, "evaluation": 3, "testing": 3,
    "app": 4,
    "__main__": 5,
}  # fmt: skip
RUNTIME_MAY_IMPORT = {"core", "config", "runtime"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports run too, so they count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> str:
    """`psr_ray.pipeline.loop` -> `pipeline`; the package itself -> `psr_ray`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, imports in sorted(graph.items()):
        here = layer_of(module)
        for target in sorted(imports):
            there = layer_of(target)
            if "psr_ray" in (here, there) or here == there:
                continue
            if there == "testing":
                ok = False
            elif here == "runtime":
                ok = there in RUNTIME_MAY_IMPORT
            else:
                ok = there == "runtime" or LAYERS[there] <= LAYERS[here]
            if not ok:
                bad.append(f"{module} -> {target}")
    return bad


def test_the_graph_sees_imports_at_every_depth():
    graph = import_graph()
    assert "psr_ray.search.scheduler" in graph["psr_ray.pipeline.search_stage"]  # module level
    assert "psr_ray.pipeline.search_stage" in graph["psr_ray.pipeline.loop"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_psr_ray_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_every_package_is_in_a_layer():
    packages = {layer_of(module_name(p)) for p in PACKAGE.rglob("*.py")} - {"psr_ray"}
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


def test_no_import_runs_up_the_layers():
    assert layer_violations({"psr_ray.config.x": {"psr_ray.data.y"}}) == ["psr_ray.config.x -> psr_ray.data.y"]
    assert layer_violations({"psr_ray.runtime.x": {"psr_ray.engines.y"}}) == ["psr_ray.runtime.x -> psr_ray.engines.y"]
    assert layer_violations({"psr_ray.pipeline.x": {"psr_ray.testing"}}) == ["psr_ray.pipeline.x -> psr_ray.testing"]
    assert layer_violations({"psr_ray.app.x": {"psr_ray.core.y", "psr_ray.runtime.z"}}) == []
    bad = layer_violations(import_graph())
    assert not bad, bad


def test_readme_layout_names_every_package_and_top_level_module():
    """The README's Layout section is the map: each package (`core/`) and each module (`loop.py`) appears in it,
    and every module it names exists."""
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    wanted = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    wanted |= {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(name for name in wanted if name not in layout)
    assert not missing, f"README's Layout leaves out {missing}"
    named = set(re.findall(r"\b([a-z_]+\.py)\b", layout))
    existing = {p.name for p in ROOT.rglob("*.py") if ".venv" not in p.parts}
    assert not named - existing, f"README's Layout names modules that do not exist: {sorted(named - existing)}"


def test_no_module_is_over_400_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_tests_never_import_bench_and_bench_only_the_shared_scenarios():
    for path in (ROOT / "tests").rglob("*.py"):
        bad = {m for m in imported_modules(path) if m == "bench" or m.startswith("bench.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    for path in (ROOT / "bench").rglob("*.py"):
        bad = {m for m in imported_modules(path) if (m == "tests" or m.startswith("tests."))
               and not m.startswith("tests.scenarios")}  # fmt: skip
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_test_scenarios_are_not_packaged():
    assert not (PACKAGE / "testing" / "faults.py").exists()
    assert (ROOT / "tests" / "scenarios" / "bad_input.py").is_file()


def test_the_longest_test_files_named_for_the_suites_order_exist():
    from tests.conftest import LONGEST_FILES

    assert [f for f in LONGEST_FILES if not (ROOT / f).is_file()] == []
