"""Every command shown in README.md and docs/*.md runs, as a user types it.

Commands are read from the ```bash blocks (continuation lines joined, comments dropped, `a && b`
split into its steps); a block tagged otherwise (```text for a synopsis or an output) holds no
command, and `test_commands_are_in_bash_blocks` makes sure no command hides in an untagged block.
RULES says how each command runs here: which documented overrides make it cheap (train commands
run 2 steps, generation a few tokens), which placeholders stand for which files, and what shows
that it worked. A command that no rule matches fails `test_every_documented_command_has_a_runner`,
naming it, so a command added to the docs is covered or says it is not.

The commands of one document run in order, in one workspace shared by all documents (a temporary
directory that sees the repository's configs/, data/ and bench/), so a later command finds what an
earlier one wrote (`meshtron generate --model runs/quickstart` after the quickstart). A command that
needs the output of another document's command is listed in REQUIRES, and it runs first if it has
not yet. Running them is `slow`, not `acceptance`: about a hundred launches of SmolLM2 runs, servers and
torchrun jobs (the README's 18 commands alone took 8.8 minutes on 2 idle cores), more than CI's run (about 60
minutes with the acceptance tests) can hold; run them with `python -m pytest -m slow tests/integration/test_docs_commands.py`.
The shape checks (every command has a runner, the install and test commands are the ones .ci/run runs)
are in the default suite.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
CI_SCRIPT = REPO / ".ci" / "run"
COMMAND_WORDS = ("meshtron", "torchrun", "python", "pip", "curl", "printf")
TRAIN_STEPS = "--train.steps 2"  # unless the command sets its own
TIMEOUT_S = 1800  # per command: generous, so that a busy machine never fails a command


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # as shown: continuation lines joined, trailing comment dropped
    assignments: tuple[str, ...] = ()  # the document's `VAR=...` lines shown before it

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _drop_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _split_steps(text: str) -> list[str]:
    """`a && b` -> [a, b] (outside quotes); pipes stay one command."""
    steps, start = [], 0
    for match in re.finditer(r"\s&&\s", text):
        before = text[: match.start()]
        if before.count('"') % 2 == 0 and before.count("'") % 2 == 0:
            steps.append(text[start:match.start()].strip())
            start = match.end()
    steps.append(text[start:].strip())
    return steps


def fenced_blocks(doc: str):
    """(tag, first line number, lines) of every fenced block of `doc`."""
    lines = (REPO / doc).read_text().splitlines()
    block, tag, start = None, "", 0
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and block is None:
            block, tag, start = [], fence.group(1), number + 1
        elif fence:
            yield tag, start, block
            block = None
        elif block is not None:
            block.append(line)


def documented_commands(doc: str) -> list[Command]:
    commands, assignments = [], []
    for tag, start, block in fenced_blocks(doc):
        if tag not in ("bash", "sh", "shell"):
            continue
        pending, first = "", 0
        for number, raw in enumerate(block, start):
            line = _drop_comment(raw.strip())
            if not pending:
                first = number
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            text, pending = (pending + line).strip(), ""
            if not text:
                continue
            for step in _split_steps(text):
                commands.append(Command(doc, first, step, tuple(assignments)))
            if re.match(r"^[A-Z_]+=", text):
                assignments.append(text)
    return commands


# ---- runners -------------------------------------------------------------------------------------


@dataclass
class Rule:
    """How the commands matching `pattern` run here."""

    pattern: str
    kind: str  # run | train | ci | collect | serve | curl | two_nodes | cuda
    append: str = ""  # documented overrides appended to the command
    substitute: dict = field(default_factory=dict)  # placeholder (regex) -> replacement ({ws} = workspace)
    stdin: str | None = None
    prints: bool = False  # must print on stdout
    why: str = ""


CHECKPOINT_STEP = {r"checkpoints/step-\d+": "checkpoints/step-2"}  # train commands run 2 steps
QUICKSTART = "meshtron train configs/quickstart.toml"
SFT_LORA = "meshtron train configs/smollm2/sft_lora.toml"

RULES = [
    Rule(r"^pip install ", "ci", why=".ci/run installs from scratch with exactly this command"),
    Rule(r"^python -m pytest -m ", "ci", why=".ci/run runs exactly this test command"),
    Rule(r"^python -m pytest tests/", "collect", why="a subset of the default suite, which .ci/run runs"),
    Rule(r"^[A-Z_]+=\$\(meshtron assets smollm2\)$", "run"),
    Rule(r"^meshtron (--help|--version|assets smollm2)$", "run", prints=True),
    Rule(r"--nnodes 2", "two_nodes", substitute={r"HOST0:29500": "127.0.0.1:{port}", r"--nproc-per-node 8": "--nproc-per-node 2"},
         append=TRAIN_STEPS, why="both nodes on this machine, 2 ranks each (8 is a GPU node's layout)"),
    Rule(r"--device cuda", "cuda", append="--repeats 1 --new-tokens 4 --prompt-tokens 8"),
    Rule(r"^python bench/bench_inference\.py", "run", append="--repeats 1 --new-tokens 4 --prompt-tokens 8 --batch-sizes 1"),
    Rule(r"^python bench/bench_preprocess\.py", "run", append="--size-mb 1 --memory-sizes-mb 1"),
    Rule(r"^python bench/bench_serve\.py", "run", append="--requests 2 --repeats 1"),
    Rule(r"sft_long\.toml", "train", append=f"{TRAIN_STEPS} --train.seq_length 256",
         why="32k-token sequences are a GPU job; the same layout on 256 tokens"),
    Rule(r"(^|-m )meshtron train ", "train", append=TRAIN_STEPS),
    Rule(r"(^|-m )meshtron generate ", "run", append="--max-new-tokens 8", prints=True,
         substitute={r"/path/to/hf-dir": "{ws}/tiny-4-kv-heads", **CHECKPOINT_STEP}),
    Rule(r"^printf .*\| meshtron chat ", "run", append="--max-new-tokens 8", prints=True),
    Rule(r"^meshtron chat ", "run", append="--max-new-tokens 8", stdin="Hello\n/exit\n", prints=True),
    Rule(r"(^|-m )meshtron serve ", "serve"),
    Rule(r"^curl .*127\.0\.0\.1:8000/(v1/|metrics)", "curl", substitute={r"127\.0\.0\.1:8000": "127.0.0.1:{port}"}, prints=True),
    Rule(r"(^|-m )meshtron eval ", "run", append="--limit 2 --max-new-tokens 16",
         substitute={r"--data-dir DIR": "--data-dir {eval_data}"}, prints=True),
    Rule(r"^meshtron score .*--output ", "run", why="writes its scores to the file, not stdout"),
    Rule(r"^meshtron score ", "run", prints=True),
    Rule(r"^meshtron convert ", "run", substitute=CHECKPOINT_STEP),
    Rule(r"^meshtron preprocess ", "run"),
    Rule(r"(^|-m )meshtron ", "run", why="any other subcommand runs as shown"),
]

# What a command reads that an earlier documented command (maybe of another document) writes.
REQUIRES = {
    r"runs/quickstart\b": QUICKSTART,
    r"runs/smollm2_sft_lora\b": SFT_LORA,
    r"runs/smollm2_rm\b": "meshtron train configs/smollm2/rm.toml",
    r"--input hf_out\b": "meshtron convert --input runs/quickstart --output hf_out",
}


def rule_for(command: Command) -> Rule | None:
    return next((rule for rule in RULES if re.search(rule.pattern, command.text)), None)


def all_commands() -> list[Command]:
    return [command for doc in DOCS for command in documented_commands(doc)]


# ---- the shape checks (default suite) -------------------------------------------------------------


def test_the_docs_show_commands():
    """The parser finds the commands (a parser that finds none would make every check below pass)."""
    texts = [c.text for c in all_commands()]
    assert QUICKSTART in texts and SFT_LORA in texts
    assert len(texts) > 40


def test_commands_are_in_bash_blocks():
    untagged = [f"{doc}:{start}" for doc in DOCS for tag, start, block in fenced_blocks(doc)
                if tag == "" and any(line.strip().split(" ")[0] in COMMAND_WORDS for line in block)]
    assert not untagged, (f"blocks with commands but no language at {untagged}: tag them ```bash (commands, run "
                          "by this test) or ```text (a synopsis or output)")


def test_every_documented_command_has_a_runner():
    missing = [str(c) for c in all_commands() if rule_for(c) is None]
    assert not missing, "documented commands without a runner in RULES:\n" + "\n".join(missing)
    ci_script = CI_SCRIPT.read_text()
    not_in_ci = [str(c) for c in all_commands() if rule_for(c).kind == "ci" and c.text not in ci_script]
    assert not not_in_ci, "documented install/test commands that .ci/run does not run:\n" + "\n".join(not_in_ci)


# ---- running them (slow) ---------------------------------------------------------------------------

TINY_CONFIG = """
[model]
name_or_path = "llama:debug"
args = {{ num_layers = {layers} }}
[data]
mock = true
[train]
steps = 2
global_batch_size = 8
micro_batch_size = 1
seq_length = 32
output_dir = "runs/{name}"
[log]
tensorboard = false
plot = false
"""


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, smollm2_dir, eval_data_dir):
    """Where the documented commands run: the repository's configs, data and bench, the files that
    the docs' placeholders stand for, and a record of the commands already run."""
    ws = tmp_path_factory.mktemp("docs-workspace")
    for name in ("configs", "data", "bench"):
        (ws / name).symlink_to(REPO / name)
    # cfg.toml and my.toml stand for "your config": a tiny model on mock data (16 layers, so
    # that parallelism.md's uneven pipeline split [10, 6] applies).
    (ws / "cfg.toml").write_text(TINY_CONFIG.format(layers=2, name="cfg"))
    (ws / "my.toml").write_text(TINY_CONFIG.format(layers=16, name="my"))
    (ws / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What is 2 + 2?", "response": "4"}, {"prompt": "What is 2 + 2?", "response": "5"}]))
    _write_tiny_model(ws / "tiny-4-kv-heads", smollm2_dir)
    return {"dir": ws, "done": set(), "eval_data": eval_data_dir, "trained": set(), "runs": 0}


def _write_tiny_model(path: Path, smollm2_dir: Path) -> None:
    """A model that splits over 4 processes (SmolLM2's 3 key/value heads do not)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
                     ).save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).is_file():
            shutil.copy2(smollm2_dir / name, path / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    # `python`, `meshtron` and `torchrun` of this interpreter, and this checkout's meshtron.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _script(command: Command, rule: Rule, ws: dict, port: int) -> str:
    text = command.text
    for placeholder, replacement in rule.substitute.items():
        text = re.sub(placeholder, replacement.format(ws=ws["dir"], port=port, eval_data=ws["eval_data"]), text)
    if rule.append and not (rule.append == TRAIN_STEPS and "--train.steps" in text):
        text = f"{text} {rule.append}"
    if rule.kind in ("train", "two_nodes"):
        text += _fresh_output_dir(text, ws)
    return "\n".join(["set -eo pipefail", *command.assignments, text])


def _fresh_output_dir(text: str, ws: dict) -> str:
    """A config's first run writes its documented output_dir (later commands read it); another run of
    it (another layout, say) trains from scratch in a directory of its own instead of resuming that one."""
    if "--train.output_dir" in text:
        return ""
    config = re.search(r"meshtron train (\S+)", text).group(1)
    if config not in ws["trained"]:
        ws["trained"].add(config)
        return ""
    ws["runs"] += 1
    return f" --train.output_dir runs/docs-run-{ws['runs']}"


def _bash(script: str, cwd: Path, stdin: str | None = None, background: bool = False):
    kwargs = dict(cwd=cwd, env=_env(), text=True, start_new_session=True)
    if background:
        return subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)
    proc = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    try:
        out, err = proc.communicate(stdin, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {TIMEOUT_S} s)"
    return proc.returncode, out, err


def _check(command: Command, script: str, code: int, out: str, err: str, prints: bool) -> None:
    assert code == 0, f"{command}\nran as:\n{script}\nexit {code}\n{err[-4000:]}"
    # A line, not necessarily words: a model trained for 2 steps may well generate blanks.
    assert not prints or out, f"{command}\nran as:\n{script}\nprinted nothing\n{err[-2000:]}"


def _start_server(command_text: str, ws: dict, port: int, assignments=()):
    """Start `meshtron serve ...` on `port` (after the document's `VAR=...` lines); its process once /health
    answers."""
    proc = _bash("\n".join([*assignments, f"exec {command_text} --port {port}"]), ws["dir"], background=True)
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    pytest.fail(f"`{command_text}` did not start:\n{proc.stdout.read()[-4000:]}")


def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _chat_request(port: int) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return json.loads(response.read())


def run_command(command: Command, ws: dict) -> None:
    rule = rule_for(command)
    for pattern, needed in REQUIRES.items():
        if re.search(pattern, command.text) and command.text != needed and needed not in ws["done"]:
            run_command(_find_command(needed), ws)
    port = _free_port()
    script = _script(command, rule, ws, port)
    if rule.kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"needs CUDA: {command}")
    if rule.kind in ("run", "train", "cuda"):
        code, out, err = _bash(script, ws["dir"], stdin=rule.stdin)
        _check(command, script, code, out, err, rule.prints)
    elif rule.kind == "serve":
        server = _start_server(command.text, ws, port, command.assignments)
        try:
            assert _chat_request(port)["choices"][0]["message"]["content"] is not None
        finally:
            _stop(server)
    elif rule.kind == "curl":
        server = _start_server("meshtron serve --model $MODEL", ws, port, command.assignments)
        try:
            code, out, err = _bash(script, ws["dir"])
            _check(command, script, code, out, err, rule.prints)
            if "/metrics" in command.text:  # Prometheus text: the server's counters by name
                assert "meshtron_" in out, out
            else:
                assert json.loads(out)["choices"], out
        finally:
            _stop(server)
    elif rule.kind == "two_nodes":
        nodes = [_bash(script, ws["dir"], background=True) for _ in range(2)]
        for node in nodes:
            out, _ = node.communicate(timeout=TIMEOUT_S)
            _check(command, script, node.returncode, out, out, False)
    elif rule.kind == "collect":
        args = [a for a in shlex.split(command.text)[3:] if a != "-q"]  # -q -q would drop the count line
        counts = []
        for marker in ([], ["-m", "not slow"]):
            code, out, err = _bash(shlex.join([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                                               "no:cacheprovider", *marker, *args]), REPO)
            assert code == 0, f"{command}\n{out[-2000:]}{err[-2000:]}"
            selected = re.search(r"(\d+)(?:/\d+)? tests? collected", out)
            counts.append(int(selected.group(1)) if selected else 0)
        assert counts[0] == counts[1] > 0, f"{command} runs tests outside the default suite: {counts}"
    ws["done"].add(command.text)


def _find_command(text: str) -> Command:
    return next(c for c in all_commands() if c.text == text)


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_run(doc, workspace):
    for command in documented_commands(doc):
        if rule_for(command) is None:
            pytest.fail(f"no runner for {command} (see test_every_documented_command_has_a_runner)")
        if rule_for(command).kind != "ci" and command.text not in workspace["done"]:
            run_command(command, workspace)
