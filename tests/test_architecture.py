"""The shape of the code base: the library never imports the CLI, no import cycles, one atomic-write helper."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "models")


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the harness."""
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the harness modules it imports, at module level or inside functions alike."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                found = resolve(target)
                if found and found != name:
                    deps.add(found)
        graph[name] = deps
    return graph


def test_the_library_never_imports_typer_or_the_cli():
    code = ("import sys, bench.train, bench.sample, bench.speed, bench.quality, bench.report, bench.pipeline, "
            "bench.data, bench.synth, bench.parser, bench.doctor, bench.gpucheck, models; "
            "print(sorted(m for m in sys.modules if m == 'typer' or m.startswith(('typer.', 'bench.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    graph = import_graph()
    outside = [m for m in graph if not m.startswith("bench.cli") and any(d.startswith("bench.cli") for d in graph[m])]
    assert outside == [], f"library modules importing the CLI: {outside}"
    typer_users = [m for m, path in modules().items() if not m.startswith("bench.cli")
                   and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "typer" in ast.dump(n)
                           for n in ast.walk(ast.parse(path.read_text())))]
    assert typer_users == []


def test_no_import_cycles_among_the_harness_modules():
    graph = import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_atomic_replacement_lives_in_the_io_module_only():
    allowed = {ROOT / "bench" / "io.py", ROOT / "models" / "ssm.py"}  # ssm: the compiled kernel's cache
    offenders = [str(p.relative_to(ROOT)) for p in modules().values()
                 if p not in allowed and ("os.replace" in p.read_text() or "os.rename" in p.read_text())]
    assert offenders == []


def test_layout_page_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in modules().values()
               if p.name != "__init__.py" and str(p.relative_to(ROOT)) not in layout]
    assert missing == []


MAX_FUNCTION_LINES = 80  # def line to the last line of the body
# "file::imported module": why that import stays inside a function (a real reason: an import cycle the graph test
# shows, an optional heavy dependency); none today. Where a test replaces a function, import its module at the top
# and call through it (bench.quality: `from bench import sample as sampler`).
LIBRARY_IMPORTS_IN_FUNCTIONS: dict[str, str] = {}


def functions(tree: ast.AST):
    """Every function and method of a module, nested ones included."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in modules().values():
        name = path.relative_to(ROOT).as_posix()
        for fn in functions(ast.parse(path.read_text())):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{name}::{fn.name} ({lines} lines)")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def library_imports_in_functions(path: Path) -> set[str]:
    """The harness modules (bench.*, models.*) a file imports inside its functions."""
    found, mods = set(), modules()
    for fn in functions(ast.parse(path.read_text())):
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:  # `from bench import io`: io
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names]
            else:
                continue
            found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def test_the_library_imports_its_own_modules_at_the_top():
    # The CLI layer (bench/cli) imports the library inside its commands, so that `bench --help` stays fast.
    lazy = []
    for path in modules().values():
        name = path.relative_to(ROOT).as_posix()
        if name.startswith("bench/cli/"):
            continue
        lazy += [f"{name}::{m}" for m in sorted(library_imports_in_functions(path))
                 if f"{name}::{m}" not in LIBRARY_IMPORTS_IN_FUNCTIONS]
    assert lazy == [], f"imports of bench/models modules inside functions, without a reason: {lazy}"
    stale = [k for k in LIBRARY_IMPORTS_IN_FUNCTIONS if k.split("::")[1]
             not in library_imports_in_functions(ROOT / k.split("::")[0])]
    assert stale == [], f"allowed but no longer there (remove them from the list): {stale}"
