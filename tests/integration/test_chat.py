"""`meshtron chat` driven through its standard input, on a tiny random model."""

import signal
import subprocess
import sys
import threading

import pytest


def _chat(model_dir, *extra):
    return [sys.executable, "-m", "meshtron", "chat", "--model", str(model_dir), "--dtype", "float32", *extra]


@pytest.fixture(scope="module")
def direct(tiny_llama_dir):
    from meshtron.infer.generation import SamplingParams, generate_text
    from meshtron.infer.loading import encode_messages, load_for_generation

    loaded = load_for_generation(str(tiny_llama_dir), dtype="float32")

    def run(messages, max_new_tokens=8):
        ids = encode_messages(loaded.tokenizer, messages)
        params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=loaded.stop_token_ids)
        return generate_text(loaded.model, loaded.tokenizer, [ids], params)[0].text

    return run


def test_multi_turn_history_clear_and_end_of_input(tiny_llama_dir, direct):
    result = subprocess.run(_chat(tiny_llama_dir, "--max-new-tokens", "8", "--system", "Be brief."),
                            input="Hello\nTell me more\n/clear\nHello\n", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    system = {"role": "system", "content": "Be brief."}
    first = direct([system, {"role": "user", "content": "Hello"}])
    second = direct([system, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "Tell me more"}])
    # After /clear the history is gone: the same message gets the same reply as at the start.
    assert result.stdout == f">>> {first}\n>>> {second}\n>>> >>> {first}\n>>> \n"
    assert "conversation cleared" in result.stderr


def test_history_is_bounded_by_max_turns(tiny_llama_dir, direct):
    result = subprocess.run(_chat(tiny_llama_dir, "--max-new-tokens", "6", "--max-turns", "1"),
                            input="One\nTwo\n/exit\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first = direct([{"role": "user", "content": "One"}], 6)
    second = direct([{"role": "user", "content": "One"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "Two"}], 6)
    assert result.stdout == f">>> {first}\n>>> {second}\n>>> "
    third = subprocess.run(_chat(tiny_llama_dir, "--max-new-tokens", "6", "--max-turns", "1"),
                           input="One\nTwo\nThree\n", capture_output=True, text=True, timeout=120)
    # With one exchange kept, "Three" is answered with only the "Two" exchange before it.
    two = third.stdout.split(">>> ")[2].rstrip("\n")
    expected = direct([{"role": "user", "content": "Two"}, {"role": "assistant", "content": two},
                       {"role": "user", "content": "Three"}], 6)
    assert third.stdout.split(">>> ")[3] == expected + "\n"


def test_ctrl_c_stops_the_reply_not_the_program(tiny_llama_dir):
    """Ctrl-C is sent once the reply has started streaming (not after a sleep), so it always lands in
    the reply, however busy the machine; the deadlines only bound a hung run."""
    # As in a terminal, Ctrl-C is not ignored: a shell without job control starts background commands
    # (a CI script run with `&`) with SIGINT ignored, and their children would inherit that.
    proc = subprocess.Popen(_chat(tiny_llama_dir, "--max-new-tokens", "4000"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out: list[str] = []
    replying = threading.Event()

    def read() -> None:
        for char in iter(lambda: proc.stdout.read(1), ""):
            out.append(char)
            if len(out) > len(">>> "):  # the prompt, then the first characters of the reply
                replying.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.stdin.write("Tell me a long story\n")
    proc.stdin.flush()
    if not replying.wait(timeout=600):
        proc.kill()
        pytest.fail(f"no reply started: {proc.stderr.read()[-3000:]}")
    proc.send_signal(signal.SIGINT)
    # Read after the interrupted reply, at the prompt.
    proc.stdin.write("/exit\n")
    proc.stdin.flush()
    proc.stdin.close()
    proc.wait(timeout=600)
    reader.join(timeout=60)  # the reader alone reads stdout (communicate() would take characters from it)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert "[interrupted]" in err
    assert "".join(out).count(">>> ") == 2  # back at the prompt after the interrupted reply


@pytest.mark.parametrize("encoding", [None, "utf-8:strict"], ids=["surrogateescape", "strict"])
def test_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(tiny_llama_dir, direct, encoding):
    import os

    env = dict(os.environ, **({"PYTHONIOENCODING": encoding} if encoding else {}))
    # Typed one line at a time, as a terminal delivers them.
    proc = subprocess.Popen(_chat(tiny_llama_dir, "--max-new-tokens", "6"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdin.write(b"caf\xe9 \xff\n")
    proc.stdin.flush()
    refusal = b""
    while b"not valid UTF-8" not in refusal:
        refusal = proc.stderr.readline()
        assert refusal, "the chat ended without refusing the line"
    stdout, stderr = proc.communicate(b"Hello\n", timeout=120)
    assert proc.returncode == 0, stderr.decode()
    assert stdout.decode() == f">>> >>> {direct([{'role': 'user', 'content': 'Hello'}], 6)}\n>>> \n"
