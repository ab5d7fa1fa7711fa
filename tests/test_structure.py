"""The packages import each other without cycles and only downwards (bench -> ess -> cocolvis -> segkit),
counting imports inside functions too; the option and variant registries import no torch."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("segkit", "cocolvis", "ess", "bench")  # each may import only those before it


def project_imports(path: Path) -> set[str]:
    """The project modules `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def test_no_import_cycles():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p
               for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py") if p.name != "__init__.py"}
    graph = {m: {i for i in project_imports(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [module, dep])
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert len(graph) > 20


def test_packages_import_only_downwards():
    for rank, package in enumerate(PACKAGES):
        for path in (ROOT / package).glob("*.py"):
            above = {i.split(".")[0] for i in project_imports(path)} - set(PACKAGES[:rank + 1])
            assert not above, f"{path.relative_to(ROOT)} imports {sorted(above)}, a layer above {package}"


def test_options_and_variants_import_no_torch():
    code = ("import sys, ess.config, ess.variants, bench.cli; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
