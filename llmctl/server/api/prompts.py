"""Every API's prompt: its messages as chat templates read them, through the model's chat template, tokenized.

Legacy completions send text or token ids, taken as they are (`text_prompt`); chat completions send OpenAI's
messages (`build_prompt`); the Responses API's input items (`responses_messages`) and Anthropic's content blocks
(`anthropic_messages`) become the same messages, tool calls, tool results and earlier thinking included, and go
through the same `chat_prompt`.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from llmctl.errors import InvalidRequest
from llmctl.server.admission import encode
from llmctl.server.api.anthropic_models import (
    CountTokensRequest,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from llmctl.server.api.chat_models import ChatCompletionRequest, ChatMessage
from llmctl.server.api.responses_models import (
    Content,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputText,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
)
from llmctl.server.api.validation import valid_unicode

if TYPE_CHECKING:
    from llmctl.core.loader import LoadedModel

IGNORED_BLOCKS = ("thinking", "redacted_thinking")  # in text-only places; redacted thinking is encrypted


def build_prompt(loaded: LoadedModel, req: ChatCompletionRequest, template_kwargs: dict | None = None) -> list[int]:
    """A chat completion request's messages (and tools) through the chat template, tokenized."""
    return chat_prompt(loaded, [m.for_template() for m in req.messages], req.tools, template_kwargs=template_kwargs)


def chat_prompt(loaded: LoadedModel, messages: list[dict], tools: list[dict] | None, *, param: str = "messages",
                add_generation_prompt: bool = True, add_special_tokens: bool = False,
                template_kwargs: dict | None = None) -> list[int]:
    """Render the chat template over messages as templates read them (``template_kwargs``: a request's own
    template variables, `llmctl.server.thinking`), and tokenize it."""
    import jinja2

    extra = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
    messages = named_results(messages)
    template = str(loaded.tokenizer.chat_template or "")
    if NINE_CHAR_IDS in template:
        messages = nine_char_ids(messages)
    if ONE_ANALYSIS in template:
        messages = one_analysis(messages)
    try:
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    tokenize=False, **extra)
    except jinja2.TemplateError as exc:
        raise InvalidRequest(f"The model's chat template rejected these messages: {exc}", param=param) from exc
    except RecursionError:
        raise InvalidRequest("The messages or tools are nested too deeply to render.",
                             param="tools" if tools else param) from None
    except (TypeError, ValueError, AttributeError) as exc:
        if not template_kwargs:  # without a request's own variables, a failing template is the server's
            raise
        raise InvalidRequest(f"The model's chat template failed with these chat_template_kwargs: {exc}",
                             param="chat_template_kwargs") from exc
    return encode(loaded.tokenizer, text, add_special_tokens)


def named_results(messages: list[dict]) -> list[dict]:
    """Tool results with the name of the function they answer, found by their tool_call_id among the calls
    before them. OpenAI's tool messages, Responses' function_call_output items and Anthropic's
    tool_result blocks carry only the call's id, but some templates print the function's name with its
    result (Hermes 2 Pro's tool_response, gpt-oss' `functions.<name>` turn)."""
    names: dict[str, str] = {}
    out = []
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(call.get("id"), str) and isinstance(function.get("name"), str):
                names[call["id"]] = function["name"]
        answers = message.get("tool_call_id")
        name = names.get(answers) if message.get("role") == "tool" and isinstance(answers, str) else None
        out.append({**message, "name": name} if name and not message.get("name") else message)
    return out


# Mistral's chat templates refuse a tool call id that is not 9 letters and digits, with this message.
NINE_CHAR_IDS = "alphanumeric strings with length 9"


def nine_char_ids(messages: list[dict]) -> list[dict]:
    """Tool call ids as Mistral's templates require them (9 letters and digits), each call and its result
    mapped alike: the last 9 letters and digits of the id (OpenAI's `call_...` and Anthropic's `toolu_...`
    ids end in more than 9), or a hash of a shorter id."""

    def short(call_id: object) -> object:
        if not isinstance(call_id, str):
            return call_id
        alnum = "".join(c for c in call_id if c.isascii() and c.isalnum())
        return alnum[-9:] if len(alnum) >= 9 else hashlib.sha256(call_id.encode()).hexdigest()[:9]

    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [{**call, "id": short(call.get("id"))} if isinstance(call, dict)
                                                 else call for call in message["tool_calls"]]}
        if "tool_call_id" in message:
            message = {**message, "tool_call_id": short(message["tool_call_id"])}
        out.append(message)
    return out


# gpt-oss' chat template refuses an assistant turn with tool calls that has both content and thinking, with this.
ONE_ANALYSIS = "Cannot pass both content and thinking"


def one_analysis(messages: list[dict]) -> list[dict]:
    """Assistant turns with tool calls as gpt-oss' template takes them: its content (which that template
    writes on the analysis channel anyway) joined to the thinking the client sent back, not a 400."""
    out = []
    for message in messages:
        if message.get("tool_calls") and message.get("content") and message.get("thinking"):
            thinking = f"{message['thinking']}\n\n{message['content']}"
            message = {**message, "content": "", "thinking": thinking, "reasoning_content": thinking}
        out.append(message)
    return out


def text_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """A legacy completion's prompt, taken as it is (no chat template): text, tokenized, or token ids, checked."""
    if isinstance(prompt, str):
        ids = encode(tokenizer, valid_unicode(prompt))
        if not ids:
            raise InvalidRequest("The prompt is empty; send at least one token of text.", param="prompt")
        return ids
    vocab = len(tokenizer)
    for token in prompt:
        if not 0 <= token < vocab:
            raise InvalidRequest(f"The prompt names token {token}, outside the vocabulary (0..{vocab - 1}).",
                                 param="prompt")
    return list(prompt)


# ---- the Responses API's input items ---------------------------------------------------------------
def _content_text(content: Content, param: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if not isinstance(part, InputText):
            raise InvalidRequest(f"Content parts of type '{part.type}' are not supported: this model reads text "
                                 "only.", param=param)
        texts.append(part.text or part.refusal or "")
    return "".join(texts)


def responses_messages(req: ResponsesRequest) -> list[ChatMessage]:
    """The request's instructions and input as chat messages, function calls and their outputs included; a
    reasoning item is the thinking of the assistant turn that follows it."""
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    items = [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    thinking: list[str] = []  # reasoning items not yet given to an assistant turn
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if isinstance(item, ReasoningItem):
            thinking.append(item.text())
            continue
        if isinstance(item, MessageItem):
            messages.append(ChatMessage(role=item.role, content=_content_text(item.content, param)))
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and not thinking:  # one turn: its text, then calls
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id,
                                                content=_content_text(item.output, param)))
        else:
            raise InvalidRequest(f"Input items of type '{item.type}' are not supported; send messages, "
                                 "function_call, function_call_output and reasoning items.", param=param)
        if thinking and messages[-1].role == "assistant":
            messages[-1].reasoning_content = "\n".join(t for t in thinking if t) or None
        thinking = []
    if not any(m.role != "system" for m in messages):
        raise InvalidRequest("'input' must contain at least one message.", param="input")
    return messages


# ---- Anthropic's content blocks ---------------------------------------------------------------------
def _block_text(blocks: str | list, param: str) -> str:
    if isinstance(blocks, str):
        return blocks
    parts = []
    for block in blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif block.type not in IGNORED_BLOCKS:
            raise InvalidRequest(f"Content blocks of type '{block.type}' are not supported here: this model reads "
                                 "text only.", param=param)
    return "".join(parts)


def anthropic_messages(req: CountTokensRequest) -> list[dict]:
    """The system prompt and messages as the chat template reads them, tool use and results included."""
    messages: list[ChatMessage] = []
    if req.system:
        messages.append(ChatMessage(role="system", content=_block_text(req.system, "system")))
    for i, message in enumerate(req.messages):
        param = f"messages[{i}].content"
        blocks = [TextBlock(type="text", text=message.content)] if isinstance(message.content, str) \
            else message.content
        text, calls, thinking = [], [], []
        for block in blocks:
            if isinstance(block, ThinkingBlock):
                thinking.append(block.thinking)
            elif isinstance(block, ToolResultBlock):  # each result is a tool message, before the user's text
                content = _block_text(block.content or "", param)
                messages.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id, content=content))
            elif isinstance(block, ToolUseBlock):
                calls.append({"id": block.id, "type": "function", "function": {
                    "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
            else:
                text.append(_block_text([block], param))
        if text or calls or thinking or not blocks:
            messages.append(ChatMessage(role=message.role, content="".join(text) if text or not calls else None,
                                        tool_calls=calls or None, reasoning_content="\n".join(thinking) or None))
    return [m.for_template() for m in messages]
