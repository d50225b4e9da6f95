"""docs/architecture.md names only code that exists: its `file.py: name`, `llmctl.module.name`, `Class.method` and
`file.py` citations."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmctl"
DOC = ROOT / "docs" / "architecture.md"

FILE_NAME = re.compile(r"`([\w/]+(?:\.py)?):\s+([\w.]+)`")  # `server/api/chat.py: handle`, `engine/x.py: A.b`
DOTTED = re.compile(r"`(llmctl(?:\.\w+)+)`")  # `llmctl.engine.base.EngineOptions`
CLASS_MEMBER = re.compile(r"`([A-Z]\w*)\.(\w+)(?:\(\))?`")  # `Service.start`
FILE = re.compile(r"`([\w/]+\.py)`")  # `engine/shared.py`


def resolve(cited: str) -> Path | None:
    """The module a citation names: relative to llmctl/ (with or without `.py`; a package's `__init__.py`),
    else the one file under llmctl/ whose path ends with it."""
    cited = cited.removeprefix("llmctl/")
    for candidate in (PACKAGE / cited, PACKAGE / f"{cited}.py", PACKAGE / cited / "__init__.py"):
        if candidate.is_file():
            return candidate
    found = [p for p in PACKAGE.rglob("*.py") if p.as_posix().endswith("/" + cited)]
    return found[0] if len(found) == 1 else None


def _names(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """What a module or class body defines: functions, classes, assigned and annotated names."""
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


@functools.cache
def definitions(path: Path) -> dict[str, ast.stmt]:
    return _names(ast.parse(path.read_text(encoding="utf-8")).body)


@functools.cache
def exported(path: Path) -> set[str]:
    """The names a module offers besides its own definitions: those it imports at its top level and those its
    `__all__` lists (a package's `__init__.py` may load them lazily)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    names = {(alias.asname or alias.name).split(".")[0] for node in body
             if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    listed = definitions(path).get("__all__")
    if isinstance(listed, ast.Assign):
        names |= set(ast.literal_eval(listed.value))
    return names


def dotted_exists(dotted: str) -> bool:
    """Whether ``llmctl.a.b`` is a module, or a module's name (defined or imported there; `Class.member` too)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = PACKAGE.parent.joinpath(*parts[:cut])
        path = next((p for p in (module.with_suffix(".py"), module / "__init__.py") if p.is_file()), None)
        if path is not None:
            rest = ".".join(parts[cut:])
            return not rest or defines(path, rest) or rest in exported(path)
    return False


def defines(path: Path, dotted: str) -> bool:
    """Whether ``path`` defines ``dotted`` (`name`, or `Class.member`)."""
    scope = definitions(path)
    *outer, last = dotted.split(".")
    for name in outer:
        node = scope.get(name)
        if not isinstance(node, ast.ClassDef):
            return False
        scope = _names(node.body)
    return last in scope


def problems(text: str) -> list[str]:
    found = []
    for cited, name in FILE_NAME.findall(text):
        path = resolve(cited)
        if path is None:
            found.append(f"`{cited}: {name}`: no such module under llmctl/")
        elif not defines(path, name):
            found.append(f"`{cited}: {name}`: {path.relative_to(ROOT)} defines no {name}")
    for dotted in DOTTED.findall(text):
        if not dotted_exists(dotted):
            found.append(f"`{dotted}`: no such module or name under llmctl/")
    modules = sorted(PACKAGE.rglob("*.py"))
    for cls, member in CLASS_MEMBER.findall(text):
        if not any(defines(path, f"{cls}.{member}") for path in modules):
            found.append(f"`{cls}.{member}`: no class {cls} in llmctl/ has {member}")
    for cited in FILE.findall(text):
        if resolve(cited) is None and not (ROOT / cited).is_file():
            found.append(f"`{cited}`: no such file")
    return found


def test_architecture_doc_names_only_code_that_exists():
    assert not problems(DOC.read_text(encoding="utf-8")), "\n".join(problems(DOC.read_text(encoding="utf-8")))


def test_the_check_finds_what_the_doc_used_to_name():
    """The walk-through once named functions that had gone; each of these must be caught."""
    stale = ("`server/app.py: chat_completions` `server/service.py: Service.chat` `Service.chat` `Service._sse` "
             "`Service._record` `engine/nowhere.py: run` `server/nowhere.py` `engine/batch.py:\nnowhere` "
             "`llmctl.engine.Nowhere` `llmctl.nowhere` `llmctl.engine.base.Engine.nowhere` `llmctl.schemas`")
    assert len(problems(stale)) == 12, problems(stale)
    assert not problems("`server/service.py: Service.start` `Run.end` `engine/batch.py: merge` `tools/detect.py` "
                        "`engine/batch.py:\nmerge` `llmctl.engine.Engine` `llmctl.engine.base.EngineOptions` "
                        "`llmctl.server` `llmctl.errors.LLMCtlError.to_body`")
