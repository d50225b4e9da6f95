"""One request flows one way (docs/architecture.md, "One chat request"): an API's handler calls into the service
only to admit the request (`Service.admit`, or `Service.context` for the routes that generate nothing) and to start
it (`Service.start`); everything else it reads from the request's `RequestContext`, and its render stage (every
function but the handler) never sees the service.

How this test was checked: putting back `service.reasoning_parser(prompt)` in api/chat.py's handle made
`test_handlers_call_the_service_only_to_admit_and_start` fail naming it, and giving chat.py's `_answer` a
`service` parameter made `test_render_stages_never_see_the_service` fail; both were then taken out again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[2] / "llmctl" / "server" / "api"
# Each generation API's module and the functions the app calls with the service (its entry points).
HANDLERS = {"chat.py": {"handle"}, "completions.py": {"handle"}, "responses_api.py": {"handle"},
            "anthropic.py": {"handle", "count_tokens"}, "tokenize.py": {"tokenize", "detokenize"}}
ALLOWED = {"admit", "context", "start"}
# The Responses API keeps and reads stored responses through llmctl.server.api.stored, which takes the service.
STORE = "stored"


def _functions(module: str) -> list[ast.FunctionDef]:
    tree = ast.parse((API / module).read_text(encoding="utf-8"))
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]


@pytest.mark.parametrize("module", sorted(HANDLERS))
def test_handlers_call_the_service_only_to_admit_and_start(module: str):
    used = []
    for function in _functions(module):
        for node in ast.walk(function):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "service" \
                    and node.attr not in ALLOWED:
                used.append(f"{module}:{node.lineno} {function.name} reads service.{node.attr}")
    assert not used, "\n".join(used)


@pytest.mark.parametrize("module", sorted(HANDLERS))
def test_render_stages_never_see_the_service(module: str):
    leaks = []
    for function in _functions(module):
        if function.name in HANDLERS[module]:
            continue
        names = {a.arg for a in function.args.args + function.args.kwonlyargs}
        if "service" in names:
            leaks.append(f"{module}:{function.lineno} {function.name} takes the service")
    assert not leaks, "\n".join(leaks)


@pytest.mark.parametrize("module", sorted(HANDLERS))
def test_the_service_goes_only_to_the_store(module: str):
    """A handler hands the service on only to the stored-responses module (which reads `service.responses`)."""
    passed = []
    for function in _functions(module):
        for node in ast.walk(function):
            if not isinstance(node, ast.Call) or not any(isinstance(a, ast.Name) and a.id == "service"
                                                         for a in node.args):
                continue
            target = node.func
            owner = target.value.id if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                else None
            if owner != STORE:
                passed.append(f"{module}:{node.lineno} {function.name} hands the service to {ast.unparse(target)}")
    assert not passed, "\n".join(passed)
