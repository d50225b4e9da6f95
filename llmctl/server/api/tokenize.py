"""POST /tokenize and /detokenize, in vLLM's shapes: count a prompt's tokens before sending it.

/tokenize takes a `prompt` (text, tokenized as /v1/completions does) or chat `messages` (rendered
with the chat template, as /v1/chat/completions does, `tools` included); /detokenize turns token
ids back into text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import ConfigDict, Field, StrictBool, StrictInt

from llmctl.errors import InvalidRequest
from llmctl.server.admission import encode
from llmctl.server.api import rules
from llmctl.server.api.chat_models import ChatMessage
from llmctl.server.api.prompts import chat_prompt
from llmctl.server.api.validation import Lenient, Strict, parse_body, valid_unicode
from llmctl.server.limits import check_request

if TYPE_CHECKING:
    from llmctl.server.service import Service


class TokenizeRequest(Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: list[dict] | None = None
    add_special_tokens: StrictBool | None = None  # vLLM's defaults: true for a prompt, false for messages
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False

    model_config = ConfigDict(json_schema_extra=rules.PROMPT_OR_MESSAGES)


class DetokenizeRequest(Lenient):
    model: str | None = None
    tokens: list[StrictInt]


class Tokenized(Strict):  # /tokenize's answer
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class Detokenized(Strict):  # /detokenize's answer
    prompt: str


def tokenize(service: Service, body: object) -> dict:
    context = service.context()
    req = parse_body(TokenizeRequest, body)
    loaded = context.serving(req.model).loaded
    tokenizer = loaded.tokenizer
    if req.prompt is not None and req.messages is None:
        special = req.add_special_tokens is not False
        tokens = encode(tokenizer, valid_unicode(req.prompt), special)
    elif req.messages is not None and req.prompt is None:
        check_request(context.limits, messages=len(req.messages))
        tokens = chat_prompt(loaded, [m.for_template() for m in req.messages], req.tools, param="messages",
                             add_generation_prompt=req.add_generation_prompt,
                             add_special_tokens=bool(req.add_special_tokens))
    else:
        raise InvalidRequest("Send either 'prompt' (text) or 'messages' (chat messages).", param="prompt")
    strs = [context.token_text.text_of(t) for t in tokens] if req.return_token_strs else None
    return Tokenized(count=len(tokens), max_model_len=loaded.context_length, tokens=tokens,
                     token_strs=strs).model_dump()


def detokenize(service: Service, body: object) -> dict:
    context = service.context()
    req = parse_body(DetokenizeRequest, body)
    loaded = context.serving(req.model).loaded
    vocab = len(loaded.tokenizer)
    for token in req.tokens:
        if not 0 <= token < vocab:
            raise InvalidRequest(f"Token {token} is outside the vocabulary (0..{vocab - 1}).", param="tokens")
    return Detokenized(prompt=loaded.tokenizer.decode(req.tokens)).model_dump()
