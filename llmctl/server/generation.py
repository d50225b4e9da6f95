"""One sequence's trip through the engine: chat prompts, and turning its tokens into text."""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from llmctl.core.loader import LoadedModel
from llmctl.engine import Finish, Sequence
from llmctl.engine.sampling import TokenLogprobs
from llmctl.engine.text import IncrementalDetokenizer, StopMatcher
from llmctl.errors import InvalidRequest, RequestTimeout
from llmctl.server.admission import encode
from llmctl.server.api.chat_models import ChatCompletionRequest

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a handler checks whether its client went away
DEADLINE_SLACK_S = 2.0  # past its deadline plus this, a handler gives up on its sequence by itself


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


@dataclass
class Timing:
    arrived: float
    first_token: float | None = None
    last_token: float | None = None


class Generation:
    """Iterates over the text deltas of a submitted sequence, applying stop strings.

    After the iteration ends, ``finish_reason`` and ``completion_tokens`` are set. A timeout
    raises RequestTimeout; an engine failure raises the engine's error.
    """

    def __init__(self, seq: Sequence, tokenizer, stops: list[str], arrived: float,
                 disconnected: Callable[[], bool] | None = None, hidden: frozenset[int] | None = None) -> None:
        self.seq = seq
        self.detok = IncrementalDetokenizer(tokenizer, hidden)
        self.stops = StopMatcher(stops)
        self.disconnected = disconnected
        self.timing = Timing(arrived)
        self.completion_tokens = 0
        self.streamed_tokens = 0  # tokens that arrived as events (not the end-of-sequence token)
        self._logprobs_taken = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        seq = self.seq
        next_check = time.monotonic() + POLL_S
        while True:
            try:
                event = seq.events.get(timeout=POLL_S)
            except queue.Empty:
                event = None
            now = time.monotonic()
            # On a clock, not only when tokens pause: on a GPU they never pause for POLL_S.
            if now >= next_check:
                next_check = now + POLL_S
                if self.disconnected is not None and self.disconnected():
                    seq.cancel()
                    self.finish_reason = "cancelled"
                    return
                if seq.deadline is not None and now > seq.deadline + DEADLINE_SLACK_S:
                    # The engine ends timed-out sequences itself; this only guards against it never doing so.
                    seq.cancel()
                    yield from self._finish(Finish("timeout"))
                    return
            if event is None:
                continue
            if isinstance(event, Finish):
                yield from self._finish(event)
                return
            self.timing.first_token = self.timing.first_token or now
            self.timing.last_token = now
            self.completion_tokens += 1
            self.streamed_tokens += 1
            text, stopped = self.stops.feed(self.detok.add(event))
            if text:
                yield text
            if stopped:
                seq.cancel()
                self.finish_reason = "stop"
                return

    def _finish(self, event: Finish) -> Iterator[str]:
        if event.reason in ("stop", "length"):
            if event.reason == "stop":
                self.completion_tokens += 1  # the end-of-sequence token
            tail = self.stops.flush()
            if tail:
                yield tail
            self.finish_reason = event.reason
        elif event.reason == "timeout":
            self.finish_reason = "timeout"
            raise RequestTimeout(
                f"The request did not finish within its timeout ({self.completion_tokens} tokens generated); "
                "generation was stopped. Raise 'timeout' (max 300 s) or lower max_tokens.")
        elif event.reason == "cancelled":
            self.finish_reason = "cancelled"
        else:
            self.finish_reason = "error"
            raise event.error or RuntimeError("generation failed")

    def take_logprobs(self) -> list[TokenLogprobs]:
        """The log-probabilities of the tokens received since the last call (when the request asked)."""
        items = self.seq.logprobs[self._logprobs_taken:self.streamed_tokens]
        self._logprobs_taken += len(items)
        return items

    def close(self) -> None:
        """Stop the sequence if the consumer leaves before the end (a client gone: counted as "cancelled").

        A client that disconnects is noticed either here (the server's write fails and the stream is
        closed) or by the polling in ``__iter__``, whichever comes first: both count it the same."""
        if not self.seq.done:
            self.seq.cancel()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self.stops.matched

    @property
    def ttft(self) -> float | None:
        return None if self.timing.first_token is None else self.timing.first_token - self.timing.arrived

    @property
    def itl(self) -> float | None:
        t = self.timing
        if t.first_token is None or t.last_token is None or self.streamed_tokens < 2:
            return None
        return (t.last_token - t.first_token) / (self.streamed_tokens - 1)
