"""The package's parts and the directions their imports may take (docs/architecture.md).

Each module's imports of llmctl, at the top and inside functions, are read with `ast`; a part may
import only the parts listed for it below, and never another part's private (underscore) names.

How this test was checked: adding `from llmctl.server import schemas` to llmctl/engine/batch.py made
`test_imports_flow_downwards` fail with "llmctl/engine/batch.py:… imports llmctl.server.schemas, but
engine may import only core, shared"; adding `from llmctl.engine.builtin import _abort_reason` to
llmctl/server/generation.py made `test_no_part_imports_private_names_of_another` fail; putting back
vllmcheck.py's `if TYPE_CHECKING: from llmctl.doctor.checks import Machine` made `test_no_import_cycles` fail
with "llmctl.doctor.checks -> llmctl.doctor.vllmcheck -> llmctl.doctor.checks", and the same import inside a
function of vllmcheck.py made `test_no_import_cycles_through_imports_inside_functions_either` fail with that cycle.
The lines were then removed.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmctl"
SHARED = {"errors", "envvars", "keyfile", "__init__"}

# part -> the parts it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "cli": {"server", "client", "doctor", "bench", "engine", "core", "shared"},
    "server": {"engine", "core", "shared"},
    "doctor": {"client", "core", "shared"},
    "bench": {"client", "core", "shared"},
    "client": {"shared"},
    "engine": {"core", "shared"},
    "core": {"shared"},
    "shared": set(),
}
PARTS = ("cli", "server", "client", "doctor", "bench", "engine", "core")
MAX_LINES = 500


def part_of(module: str) -> str:
    """'llmctl.engine.builtin' -> 'engine'; 'llmctl.errors' -> 'shared'."""
    pieces = module.split(".")
    if len(pieces) == 1:
        return "shared"
    head = pieces[1]
    if head in PARTS:
        return head
    if head == "__main__":
        return "cli"
    if head in SHARED:
        return "shared"
    raise AssertionError(f"{module} belongs to no known part: add it to a package or to tests/test_layout.py")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def llmctl_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import of llmctl in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.split(".")[0] == "llmctl"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "llmctl":
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def _submodule(module: str, name: str) -> str:
    """``module.name`` when ``from module import name`` imports a module, else ``module``."""
    path = PACKAGE.parent.joinpath(*module.split("."), name)
    return f"{module}.{name}" if path.with_suffix(".py").exists() or path.is_dir() else module


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_part():
    for path in MODULES:
        part_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_flow_downwards(path: Path):
    here = part_of(module_name(path))
    problems = []
    for line, module, names in llmctl_imports(path):
        targets = [module] if not names else [_submodule(module, n) for n in names]
        for target in set(targets):
            there = part_of(target)
            if there != here and there not in ALLOWED[here]:
                allowed = ", ".join(sorted(ALLOWED[here])) or "nothing else"
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}, but {here} may "
                                f"import only {allowed}")
    assert not problems, "\n".join(problems)


def test_no_part_imports_private_names_of_another():
    problems = []
    for path in MODULES:
        here = part_of(module_name(path))
        for line, module, names in llmctl_imports(path):
            if part_of(module) == here:
                continue
            private = [n for n in names + module.split(".") if _private(n)]
            if private:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports private {private} from {module}")
    assert not problems, "\n".join(problems)


def test_no_module_is_over_the_size_limit():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in MODULES
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_package_says_what_it_does_and_may_import():
    for part in PARTS:
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "may import" in doc.lower(), f"llmctl/{part}/__init__.py needs a docstring saying what it " \
                                                    "does and what it may import"


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs or declares at its top level (in `if TYPE_CHECKING:` and `try:` blocks too),
    not those inside functions or classes, which wait until they run."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for block in ("body", "orelse", "finalbody"):
                found += _module_level(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                found += _module_level(handler.body)
    return found


def import_graph(inside_functions: bool = False) -> dict[str, set[str]]:
    """Each llmctl module -> the llmctl modules it imports at its top level (and inside its functions too)."""
    modules = {module_name(path): path for path in MODULES}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))] if inside_functions \
            else _module_level(tree.body)
        targets: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif node.level == 0 and node.module:
                targets |= {_submodule(node.module, alias.name) for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def assert_acyclic(graph: dict[str, set[str]]) -> None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        raise AssertionError("import cycle: " + " -> ".join(error.args[1])) from None


def test_no_import_cycles():
    """No module reaches itself through top-level imports (type-only ones included: a cycle that typing
    needs is still two modules that each need the other). Shared pieces go down into a module both import."""
    assert_acyclic(import_graph())


# Imports deferred into a function on purpose: an engine's options module (torch-free, so that `serve` checks its
# flags in milliseconds) imports the engine it builds only in `build`, and the engine imports its options.
DEFERRED_ON_PURPOSE = {("llmctl.engine.builtin_setup", "llmctl.engine.builtin"),
                       ("llmctl.engine.vllm_setup", "llmctl.engine.vllm")}


def test_no_import_cycles_through_imports_inside_functions_either():
    """A function's import runs when both modules are loaded, so it cannot fail as a top-level cycle does; still,
    two modules that need each other are one piece. Only the deferred imports listed above close a cycle."""
    graph = import_graph(inside_functions=True)
    for importer, imported in DEFERRED_ON_PURPOSE:
        assert imported in graph[importer], f"{importer} no longer imports {imported}: drop it from DEFERRED_ON_PURPOSE"
        graph[importer].discard(imported)
    assert_acyclic(graph)
