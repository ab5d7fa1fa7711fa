"""The packages import each other without cycles, counting imports inside functions too."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cocolvis", "ess", "bench")


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
