"""schemathesis hooks for scripts/fuzz_openapi.py: which refusals of a schema-valid request are right.

The OpenAPI document states every rule a JSON schema can carry. A few refusals depend on what no static
document knows: the served model's limits (its context, its vocabulary, the server's batch slots and message
limit), the deadline the client chose (`timeout`), or a value whose validity JSON Schema cannot describe (a
regex or grammar the grammar engine cannot compile, a tool_choice naming a tool the request does not list).
Such a refusal, and only such, is not counted as "schema-valid request rejected"; schemathesis reports how
many it dropped, and each one's response still passes every other check.
"""

from __future__ import annotations

import atexit
import json
import re
from collections import Counter

import schemathesis

# (what the error message says, why the document cannot say it)
EXPECTED_REFUSALS = (
    (r"maximum context length", "prompt + max_tokens over the served model's context"),
    (r"outside the vocabulary", "a token id the served model's vocabulary does not have"),
    (r"more than this server runs at once", "n over the server's --max-num-seqs"),
    (r"more than this server's limit", "messages over the server's --max-messages"),
    (r"KV cache", "prompt + max_tokens over the server's KV budget"),
    (r"did not finish within its timeout", "the request's own timeout passed"),
    (r"^(Unsupported|Invalid) (JSON schema|regex|grammar|choice) in '",
     "a JSON schema, regex or grammar the grammar engine cannot compile"),
    (r"'structured_outputs.json' is not valid JSON", "JSON text that is not JSON"),
    (r"which is not in 'tools'", "tool_choice names a tool the request does not list"),
    (r"other than n \(", "best_of other than n"),
    (r"must be greater than thinking.budget_tokens", "thinking.budget_tokens compared with max_tokens"),
    (r"does not serve LoRA adapters", "the LoRA routes of a server started without --lora or --enable-lora"),
    (r"^LoRA adapter", "a LoRA adapter folder on the server's disk, or whether a name is loaded now"),
    (r"Input should be a valid integer",
     "an integer written as a decimal (4.0): JSON Schema counts it an integer, llmctl (as OpenAI's API) does not"),
)


def refusal_reason(status: int, text: str) -> str | None:
    """Why a refusal of a schema-valid request is right, or None when it is a finding."""
    if status not in (400, 408):
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return None
    message = (body.get("error") or {}).get("message", "") if isinstance(body, dict) else ""
    return next((why for pattern, why in EXPECTED_REFUSALS if re.search(pattern, message)), None)


DROPPED: Counter[str] = Counter()


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure but a right refusal of a schema-valid request (ST202)."""
    if type(failure).__name__ != "RejectedPositiveData":
        return True
    reason = refusal_reason(response.status_code, response.text)
    if reason is not None:
        DROPPED[reason] += 1
    return reason is None


@atexit.register
def _report() -> None:
    for reason, count in DROPPED.most_common():
        print(f"right refusal of a schema-valid request ({count}x): {reason}")
