"""`llmctl chat`: one-shot answers and the interactive session, driven through standard input."""

from __future__ import annotations

import json
import os
import pty
import queue
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from llmctl import envvars
from llmctl.cli.app import app
from llmctl.client import Client
from llmctl.client.config import ENV_VARS, LLMSettings
from llmctl.client.repl import Conversation, read_message, run_repl
from llmctl.core.loader import LoadOptions
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import free_port, serve_in_thread
from tests.client.test_client import StandIn, stand_in  # noqa: F401 - the fixture


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in [*ENV_VARS.values(), envvars.CONFIG, envvars.SYSTEM_PROMPT, envvars.API_KEY_FILE]:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture()
def loading(tiny_model):
    """A service whose model is still loading (until a test calls load())."""
    service = Service(ServiceSettings(load=LoadOptions(model_path=tiny_model, dtype="float32", device="cpu")))
    with serve_in_thread(service) as url:
        yield url, service
    service.shutdown()


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(app, ["chat", *args], input=input)


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the terminal width


# ---- one question -----------------------------------------------------------------------------
def test_one_shot_question_prints_the_answer_and_exits(base_url):
    result = run("Hello there", "--url", base_url, "--max-tokens", "6")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and result.stderr == ""
    assert "tokens/s" not in result.stdout  # only the answer, for scripts


def test_one_shot_from_piped_stdin(base_url):
    result = run("--url", base_url, "--max-tokens", "4", "--system", "Answer briefly.",
                 input="What is\n2 + 2?\n")
    assert result.exit_code == 0, result.output
    assert ">>>" not in result.stdout


def test_one_shot_with_empty_stdin_is_an_error(base_url):
    result = run("--url", base_url, input="")
    assert result.exit_code == 1 and "Nothing to ask" in result.stderr


def test_one_shot_when_the_service_is_down(monkeypatch):
    monkeypatch.setenv("LLMCTL_RETRY_ATTEMPTS", "0")
    result = run("hi", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.exit_code == 1 and "is not reachable" in flat(result.stderr)
    assert "Traceback" not in result.output


# ---- the session ------------------------------------------------------------------------------
def test_session_checks_health_streams_and_shows_stats(base_url):
    result = run("-i", "--url", base_url, "--max-tokens", "5", input="hello\n/exit\n")
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert f"Connected to {base_url}: tiny-llama on cpu" in out
    assert "tokens ·" in out and "tokens/s" in out


def test_session_commands_and_history(base_url, tmp_path):
    saved, after_reset = tmp_path / "chat.json", tmp_path / "reset.json"
    script = "\n".join([
        "/system Be brief.",
        "first question",
        '"""',
        "line one",
        "line two",
        '"""',
        "joined \\",
        "by a backslash",
        f"/save {saved}",
        "/reset",
        f"/save {after_reset}",
        "/system",
        "/help",
        "/nonsense",
    ]) + "\n"  # then end of input: Ctrl-D leaves
    result = run("--interactive", "--url", base_url, "--max-tokens", "3", input=script)
    assert result.exit_code == 0, result.output
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3
    assert messages[0]["content"] == "Be brief."
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "first question", "line one\nline two", "joined \nby a backslash"]
    assert json.loads(after_reset.read_text())["messages"] == [{"role": "system", "content": "Be brief."}]
    out = flat(result.stdout)
    assert "Be brief." in out and "/save FILE" in out and "Unknown command /nonsense" in out


def test_system_flag_and_first_question(base_url, tmp_path):
    saved = tmp_path / "s.json"
    result = run("Opening question", "-i", "--url", base_url, "--system", "You are terse.",
                 "--max-tokens", "2", input=f"/save {saved}\n/quit\n")
    assert result.exit_code == 0, result.output
    messages = json.loads(saved.read_text())["messages"]
    assert messages[0] == {"role": "system", "content": "You are terse."}
    assert messages[1] == {"role": "user", "content": "Opening question"}


def test_session_says_when_the_service_is_down():
    result = run("-i", "--url", f"http://127.0.0.1:{free_port()}", input="hello\n")
    assert result.exit_code == 1
    assert "is not reachable" in flat(result.stderr) and "llmctl serve" in flat(result.stderr)


def test_session_says_when_the_model_is_still_loading(loading, monkeypatch):
    monkeypatch.setenv("LLMCTL_TIMEOUT_SECONDS", "1")
    result = run("-i", "--url", loading[0], input="hello\n")
    assert result.exit_code == 1
    err = flat(result.stderr)
    assert "still loading; waiting up to 1 s" in err and "llmctl health --wait" in err


def test_session_waits_for_the_model_to_finish_loading(loading):
    url, service = loading
    threading.Timer(0.3, service.load).start()
    result = run("-i", "--url", url, "--max-tokens", "2", input="hello\n")
    assert result.exit_code == 0, result.output
    assert "still loading" in flat(result.stderr)
    assert "Connected to" in flat(result.stdout) and "tokens/s" in result.stdout


def test_session_falls_back_to_together_when_the_service_is_down(monkeypatch):
    together = StandIn("together")
    try:
        monkeypatch.setenv("TOGETHER_API_KEY", "tg-key")
        monkeypatch.setenv("LLMCTL_TOGETHER_BASE_URL", together.base_url)
        monkeypatch.setenv("LLMCTL_RETRY_ATTEMPTS", "0")
        result = run("-i", "--url", f"http://127.0.0.1:{free_port()}", input="hello there\n")
    finally:
        together.close()
    assert result.exit_code == 0, result.output
    assert "Answers will come from Together AI" in flat(result.stderr)
    out = flat(result.stdout)
    assert "together: hello there" in out and "answered by together" in out


# ---- Ctrl-C -----------------------------------------------------------------------------------
class Interrupted:
    """A real stream from the service that is interrupted after its first piece, as Ctrl-C would.

    CliRunner cannot deliver a signal; the subprocess test below sends a real SIGINT.
    """

    def __init__(self, stream) -> None:
        self.stream, self.closed = stream, False
        self.provider, self.completion_tokens = stream.provider, None

    def __iter__(self):
        for piece in self.stream:
            yield piece
            raise KeyboardInterrupt

    def close(self) -> None:
        self.closed = True
        self.stream.close()


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(base_url):
    console = Console(record=True, width=100)
    lines = iter(["first", "second"])
    replies = []

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    with Client(LLMSettings(self_hosted_url=base_url, max_tokens=32)) as client:
        def send(messages):
            stream = client.stream(messages, temperature=0, ignore_eos=True)
            replies.append(Interrupted(stream) if not replies else stream)
            return replies[-1]

        conversation = run_repl(send, console, read=read)
    assert replies[0].closed
    assert "Stopped." in console.export_text()
    assert [t["content"] for t in conversation.turns if t["role"] == "user"] == ["second"]


def test_ctrl_c_at_the_prompt_does_not_leave():
    console = Console(record=True, width=100)
    events = iter([KeyboardInterrupt, "/exit"])

    def read(prompt: str) -> str:
        event = next(events)
        if event is KeyboardInterrupt:
            raise KeyboardInterrupt
        return event

    assert isinstance(run_repl(lambda m: iter(()), console, read=read), Conversation)
    assert "Ctrl-D or /exit leaves" in console.export_text()


def test_read_message_forms():
    def reader(*lines):
        it = iter(lines)
        return lambda prompt: next(it)

    assert read_message(reader("  plain  ")) == "plain"
    assert read_message(reader('"""one line"""')) == "one line"
    assert read_message(reader('"""first', "second", 'third"""')) == "first\nsecond\nthird"
    assert read_message(reader("a\\", "b\\", "c")) == "a\nb\nc"


def test_ctrl_d_inside_a_block_sends_what_was_typed(stand_in):
    server = stand_in("self", reply="ok")
    result = run("-i", "--url", server.url, input='"""\nfirst line\nsecond line\n')
    assert result.exit_code == 0, result.output
    assert server.requests[-1]["body"]["messages"][-1]["content"] == "first line\nsecond line"


def test_a_message_that_starts_with_a_path_is_not_a_command(stand_in):
    server = stand_in("self", reply="ok")
    result = run("-i", "--url", server.url, input="/usr/bin is where programs live\n")
    assert result.exit_code == 0, result.output
    assert "Unknown command" not in result.stdout
    assert server.requests[-1]["body"]["messages"][-1]["content"] == "/usr/bin is where programs live"


def test_real_sigint_stops_the_answer_without_leaving(tmp_path):
    """`llmctl chat` in a subprocess, interrupted with SIGINT while a slow provider streams."""
    slow = StandIn("self", chunk_delay=0.1)
    saved = tmp_path / "after.json"
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "chat", "-i", "--url", slow.url], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
    )
    output: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: [output.put(b) for b in iter(lambda: proc.stdout.read1(4096), b"")],
                     daemon=True).start()
    seen = b""

    def wait_for(text: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            try:
                seen += output.get(timeout=0.2)
            except queue.Empty:
                pass

    try:
        wait_for(b"Connected to")
        proc.stdin.write(b"word " * 100 + b"\n")
        proc.stdin.flush()
        wait_for(b"self: word")
        proc.send_signal(signal.SIGINT)
        wait_for(b"Stopped.")
        proc.stdin.write(f"/save {saved}\n/exit\n".encode())
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
        assert json.loads(saved.read_text())["messages"] == []
        assert len(slow.requests) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        slow.close()


# ---- text from users and servers is shown as it is ---------------------------------------------
def test_brackets_in_commands_and_server_errors_are_shown_literally(stand_in):
    server = stand_in("self", fail=400, message="messages.0.content: Field required [type=missing] [/foo]")
    result = run("-i", "--url", server.url, input="/x[bold]y\nhello\n")
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert "Unknown command /x[bold]y;" in out
    assert "answered 400: messages.0.content: Field required [type=missing] [/foo]" in out


def test_one_shot_prints_the_answer_byte_for_byte(stand_in):
    text = "col1\tcol2  [bold]x[/bold] \u00e9 [red]"
    server = stand_in("self", reply=text)
    result = run("hi", "--url", server.url)
    assert result.exit_code == 0, result.output
    assert result.stdout == text + "\n"


def test_one_shot_cut_off_mid_answer_ends_the_line_and_says_so(stand_in, monkeypatch):
    monkeypatch.setenv("LLMCTL_RETRY_ATTEMPTS", "0")
    server = stand_in("self", reply="one two three four", cut_after=2)
    result = run("hi", "--url", server.url)
    assert result.exit_code == 1
    assert result.stdout == "one two\n"
    err = flat(result.stderr)
    assert "closed the connection mid-answer; the answer is cut off" in err and "not reachable" not in err


# ---- servers that are not llmctl, keys, fallbacks -----------------------------------------------
@pytest.mark.parametrize("health", [None, {"status": "ok"}, ""], ids=["no /health", "llama.cpp", "vLLM"])
def test_session_with_another_openai_compatible_server(stand_in, health):
    server = stand_in("other", health=health)
    result = run("-i", "--url", server.url, input="hello there\n")
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert f"Connected to {server.url}" in out and "other: hello there" in out
    assert "None" not in out  # no llmctl fields (model, device) to show for another server


def test_session_against_a_service_that_wants_a_key(tiny_service, monkeypatch, tmp_path):
    with serve_in_thread(tiny_service, api_keys=("k-123",)) as url:
        without = run("-i", "--url", url, "--max-tokens", "2", input="hello\n")
        once = run("hello", "--url", url, "--max-tokens", "2")
        monkeypatch.setenv("LLMCTL_API_KEY", "k-123")
        with_key = run("-i", "--url", url, "--max-tokens", "2", input="hello\n")
        monkeypatch.delenv("LLMCTL_API_KEY")
        (tmp_path / "keys").write_text("# ours\nk-123\n")
        monkeypatch.setenv("LLMCTL_API_KEY_FILE", str(tmp_path / "keys"))
        from_file = run("hello", "--url", url, "--max-tokens", "2")
    assert "answered 401" in flat(without.stdout) and "set LLMCTL_API_KEY" in flat(without.stdout)
    assert once.exit_code == 1 and "set LLMCTL_API_KEY" in flat(once.stderr)
    assert with_key.exit_code == 0 and "tokens/s" in with_key.stdout and "401" not in with_key.stdout
    assert from_file.exit_code == 0 and from_file.stderr == ""


def test_a_loading_model_does_not_hold_up_the_fallback(loading, stand_in, monkeypatch):
    together = stand_in("together")
    monkeypatch.setenv("TOGETHER_API_KEY", "tg-key")
    monkeypatch.setenv("LLMCTL_TOGETHER_BASE_URL", together.base_url)
    timeout = 60
    monkeypatch.setenv("LLMCTL_TIMEOUT_SECONDS", str(timeout))
    monkeypatch.setenv("LLMCTL_RETRY_ATTEMPTS", "0")
    started = time.monotonic()
    result = run("-i", "--url", loading[0], input="hello there\n")
    # Held up by the loading server, the question would wait out its timeout; the fallback answers without it.
    assert time.monotonic() - started < timeout
    assert result.exit_code == 0, result.output
    assert "still loading; answers come from Together AI until it is ready" in flat(result.stderr)
    assert "together: hello there" in flat(result.stdout)


def test_arrow_keys_edit_the_line(base_url, tmp_path):
    """A real terminal (a pty): with readline, Left moves the cursor instead of typing ESC [ D."""
    saved = tmp_path / "edited.json"
    main, sub = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "chat", "-i", "--url", base_url, "--max-tokens", "2"],
                            stdin=sub, stdout=sub, stderr=sub, env={**env, "TERM": "xterm"}, close_fds=True)
    os.close(sub)
    seen = bytearray()

    def wait_for(text: bytes, start: int = 0, timeout: float = 60) -> int:
        """Read until ``text`` shows up after offset ``start``; returns the offset just past it."""
        deadline = time.monotonic() + timeout
        while seen.find(text, start) < 0:
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            if select.select([main], [], [], 0.2)[0]:
                try:
                    seen.extend(os.read(main, 4096))
                except OSError:  # EIO: the child closed its terminal, so it exited; show what it printed
                    raise AssertionError(f"llmctl chat exited ({proc.wait(10)}): "
                                         f"{seen.decode(errors='replace')}") from None
        return seen.find(text, start) + len(text)

    try:
        wait_for(b">>> ")
        os.write(main, b"abc\x1b[DX\r")
        wait_for(b">>> ", wait_for(b"tokens/s"))
        os.write(main, f"/save {saved}\r".encode())
        wait_for(b"Saved")
        os.write(main, b"/exit\r")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    assert json.loads(saved.read_text())["messages"][0] == {"role": "user", "content": "abXc"}
    assert b"\x01" not in seen  # readline took the zero-width markers around the prompt's colours

