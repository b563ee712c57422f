"""The kernels package's import structure: the default path never imports
`fastattrec.kernels.experimental`, the package has no import circle (function-level
imports included), and no module imports another one's private (`_`-prefixed) names.

The structure is read from the files with `ast` (nothing is imported for the graph), so
a lazy import inside a function counts as much as one at the top of a module.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"  # installed as fastattrec.kernels (pyproject.toml package-dir)
PACKAGE = "fastattrec.kernels"
EXPERIMENTAL = PACKAGE + ".experimental"


# --------------------------------------------------------------------------------------
# The import graph, from the source
# --------------------------------------------------------------------------------------


def module_files(folder: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every .py below `folder`, `package` naming `folder`."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` statement in `module` imports from."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]  # a plain module's `.` is its package
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` starts with (`a.b.c` -> `a.b` when `a.b` is
    a module and `c` a name in it), or None when it is outside the package."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, modules: dict[str, Path]
               ) -> list[tuple[str, str | None, ast.AST]]:
    """(imported module, imported name or None, node) for every import statement anywhere
    in `module`'s file (module level, functions, branches) that names a module of
    `modules`."""
    path = modules[module]
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target:
                    out.append((target, None, node))
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from . import mod`: the module itself
                    out.append((sub, None, node))
                elif base in modules:  # `from .mod import name`
                    out.append((base, alias.name, node))
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the package's modules it imports} (explicit imports only: the implicit
    import of a parent package's __init__ is not an edge)."""
    return {m: {t for t, _, _ in imports_of(m, modules) if t != m} for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle [a, b, ..., a] of `graph`, or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_the_graph_reads_every_module():
    """The reader sees the layout it is meant to check (a guard against a test that
    passes because it read nothing)."""
    modules = module_files(KERNELS, PACKAGE)
    assert {PACKAGE, f"{PACKAGE}.attention", f"{PACKAGE}.block_layout", EXPERIMENTAL,
            f"{EXPERIMENTAL}.attention_split", f"{EXPERIMENTAL}.step_prologue"} <= set(modules)
    graph = import_graph(modules)
    # a function-level import and a `from .. import module` are both edges
    assert f"{PACKAGE}.attention" in graph[PACKAGE]
    assert f"{PACKAGE}.position_terms" in graph[f"{EXPERIMENTAL}.step_prologue"]
    assert f"{PACKAGE}.attention" in graph[f"{EXPERIMENTAL}.attention_split"]


def test_kernels_have_no_import_circle():
    cycle = find_cycle(import_graph(module_files(KERNELS, PACKAGE)))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_default_path_does_not_import_experimental_modules_statically():
    """No module outside experimental/ imports one inside it, at any level."""
    modules = module_files(KERNELS, PACKAGE)
    graph = import_graph(modules)
    bad = [(m, t) for m, targets in graph.items() if not m.startswith(EXPERIMENTAL)
           for t in targets if t.startswith(EXPERIMENTAL)]
    assert not bad, bad


def test_the_cycle_finder_finds_a_function_level_circle(tmp_path):
    """The checks above can fail: a package whose only circle goes through an import
    inside a function, and a private-name import, are both found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("thing = 1\n\ndef f():\n    from .sub import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import _private\n")
    modules = module_files(pkg, "pkg")
    cycle = find_cycle(import_graph(modules))
    assert cycle == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"], cycle
    assert private_imports(modules) == ["pkg.sub.c imports _private from pkg.a"]
    (pkg / "b.py").write_text("thing = 1\n")  # circle broken
    assert find_cycle(import_graph(module_files(pkg, "pkg"))) is None


def private_imports(modules: dict[str, Path]) -> list[str]:
    """Every place a module takes another module's private name: `from .m import _x`, or
    `m._x` on a module imported as `m` (`from . import m as alias` included)."""
    found = []
    for module, path in modules.items():
        aliases = {}
        for target, name, node in imports_of(module, modules):
            if name is not None and name.startswith("_") and target != module:
                found.append(f"{module} imports {name} from {target}")
            if name is None:
                for alias in node.names:
                    if isinstance(node, ast.ImportFrom):
                        aliases[alias.asname or alias.name] = target
                    elif alias.asname:  # `import a.b.c as m`; plain `import a.b` binds `a`
                        aliases[alias.asname] = target
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(found)


def test_no_module_imports_another_modules_private_names():
    assert private_imports(module_files(KERNELS, PACKAGE)) == []


DEFAULT_PATH = textwrap.dedent("""
    import sys

    import torch

    import fastattrec.kernels as k
    from fastattrec.kernels import attention, attention_tiles  # noqa: F401

    torch.manual_seed(0)
    d = 8
    for b, length in ((3, 5), (2, 9), (1, 65)):  # tiles, blocks, long
        pos = k.position_encoding(length, d)
        mask = torch.rand(b, length) > 0.3
        backends = ("torch", "structured", "triton", "auto")
        for backend in backends if length < 65 else ("triton",):
            x = torch.randn(b, length, d, requires_grad=True)
            w = (torch.randn(d, d) * 0.3).requires_grad_(True)
            k.short_term_attention(x, mask, w, pos, backend=backend).sum().backward()
        attention.resource_specs(length, d, "ieee", "all")
    bad = sorted(m for m in sys.modules if m.startswith("fastattrec.kernels.experimental"))
    print("EXPERIMENTAL", bad)
    before = {s.kind for s in attention.resource_specs(5, d, "ieee", "all")}
    import fastattrec.kernels.experimental.attention_split  # noqa: E402,F401
    after = {s.kind for s in attention.resource_specs(5, d, "ieee", "all")}
    print("REGISTERED", sorted(after - before))
""")


def test_default_path_imports_no_experimental_module(tmp_path):
    """`import fastattrec.kernels` and its entry points (every backend, every default
    layout, forward and backward, the resource listing) leave
    `fastattrec.kernels.experimental` unimported; the split layout's kernels join
    `resource_specs(..., "all")` once it is imported (its registration)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", DEFAULT_PATH], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "EXPERIMENTAL []" in res.stdout, res.stdout
    assert "REGISTERED ['split_bwd', 'split_fwd']" in res.stdout, res.stdout


# --------------------------------------------------------------------------------------
# The whole package: fastattrec/ with the mapped kernels/
# --------------------------------------------------------------------------------------


def package_modules() -> dict[str, Path]:
    return {**module_files(ROOT / "fastattrec", "fastattrec"), **module_files(KERNELS, PACKAGE)}


def test_the_package_has_no_import_circle_and_no_private_imports():
    modules = package_modules()
    assert {"fastattrec.training.loop", "fastattrec.experimental.steps",
            f"{PACKAGE}.structured"} <= set(modules)
    graph = import_graph(modules)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    assert private_imports(modules) == []


def test_only_the_build_hook_reaches_the_experimental_training_paths():
    """fastattrec.experimental is imported by one place of the default code, the branch
    of `fastattrec.training.build` taken when a run sets an experimental option."""
    graph = import_graph(package_modules())
    reach = sorted((m, t) for m, targets in graph.items() if ".experimental" not in m
                   for t in targets if t.startswith("fastattrec.experimental"))
    assert reach == [("fastattrec.training.build", "fastattrec.experimental.steps")], reach


DEFAULT_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path

    from fastattrec.data.prepare import PrepOptions, prepare
    from fastattrec.data.synth import synthesize
    from fastattrec.training import TrainConfig, train

    root = Path(sys.argv[1])
    synthesize(root / "r.dat", 40, 120, 1500, seed=1)
    prepare(root / "r.dat", root / "data", PrepOptions(test_negatives=10))
    experimental = sys.argv[2] == "1"
    train(root / "data", root / "run", TrainConfig(epochs=1, dim=8, device="cpu",
          compile=False, kernel="torch", one_scatter=experimental), log=lambda s: None)
    print("LOADED", sorted(m for m in sys.modules
                           if m.startswith("fastattrec") and ".experimental" in m))
""")


@pytest.mark.parametrize("experimental", [False, True])
def test_a_default_run_loads_no_experimental_module(tmp_path, experimental):
    """A whole CPU training run with the default options leaves every experimental module
    unimported; the same run with one_scatter loads them (the check can fail)."""
    res = subprocess.run([sys.executable, "-c", DEFAULT_RUN, str(tmp_path), str(int(experimental))],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("LOADED"))
    assert (line == "LOADED []") != experimental, line
