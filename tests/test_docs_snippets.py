"""Every example in the documentation runs when pasted.

The test reads each ```python, ```bash, ```sh and ```console block of README.md and docs/*.md (docs/design/ is
design notes, not instructions) and runs it: a Python block as a script, a shell block as a bash script (stopping
at the first failing line), a console block as its `$ ` lines. Each runs in a fresh directory `ROOT/NAME/`, with
`ROOT/shared` pointing at the evaluation data beside the repository (so `../shared/data` reads as it does from the
repository root), `examples/` linked in, the `allmpnet` command of this source tree first on PATH, the published
model (`all-mpnet-base-v2`) from its usual place and no network (the hub libraries are set offline).

A block that needs something special has a marker right before it (blank lines between are allowed), an HTML
comment that Markdown does not show:

    <!-- snippet: DIRECTIVE DIRECTIVE ... -->

Directives are shell-style words (a value with spaces goes in double quotes):

    skip reason="..."               not run; the reason is shown as the skip's (and by test_markers_are_valid)
    sub="OLD => NEW" reason="..."   OLD in the block is replaced by NEW before it runs: smaller arguments for a
                                    long command, or the tiny random model's directory ($TINY_MODEL) where the
                                    published one is too slow. Repeatable; the reason says why.
    tiny-model reason="..."         the tiny random model stands in for all-mpnet-base-v2 under its own name
                                    (ALLMPNET_HOME is a folder holding a verified copy of it as all-mpnet-base-v2):
                                    for blocks of several commands, each of which would load the published model
    omit="TEXT" reason="..."        shell lines holding TEXT are not run (a benchmark or an install inside a block)
    setup="COMMAND"                 a shell command run first, in the block's directory: input files it reads.
                                    Repeatable. Prefer a block that defines its own data.
    needs-server                    the test's loopback `allmpnet serve` (published model, a small index) is up;
                                    port 8000 in the block becomes that server's port
    continues                       runs in the directory of the file's previous runnable block, after it, with
                                    its model (a page's second step using what its first one wrote)
    timeout=SECONDS                 this block's bound instead of the default (60 s)

Every OLD and TEXT must occur in its block, so a marker cannot outlive the example it was written for. A block that
reads `../shared/data` is skipped, saying so, where that folder is absent.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # not docs/design/: notes, not instructions
LANGUAGES = {"python": "python", "bash": "shell", "sh": "shell", "console": "console"}
DIRECTIVES = {"skip", "reason", "sub", "omit", "setup", "needs-server", "continues", "timeout", "tiny-model"}
DEFAULT_TIMEOUT = 60
MARKER = re.compile(r"^\s*<!--\s*snippet:(.*?)-->\s*$", re.S)
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")

pytestmark = pytest.mark.real_weights  # the examples use the published model, as a reader would


@dataclass
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str  # python, shell or console
    code: str
    directives: list[tuple[str, str | None]] = field(default_factory=list)
    marker_line: int | None = None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO).as_posix()}:{self.line}"

    def values(self, key: str) -> list[str]:
        return [v for k, v in self.directives if k == key and v is not None]

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.directives)

    @property
    def reason(self) -> str | None:
        reasons = self.values("reason")
        return reasons[0] if reasons else None

    @property
    def timeout(self) -> float:
        values = self.values("timeout")
        return float(values[0]) if values else DEFAULT_TIMEOUT


def parse_directives(text: str) -> list[tuple[str, str | None]]:
    directives = []
    for word in shlex.split(text):
        key, eq, value = word.partition("=")
        directives.append((key, value if eq else None))
    return directives


def read_snippets(path: Path) -> list[Snippet]:
    lines = path.read_text(encoding="utf-8").splitlines()
    snippets, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, language = match.group(1), match.group(2)
        end = next(j for j in range(i + 1, len(lines)) if re.match(r"^\s*```\s*$", lines[j]))
        if language in LANGUAGES:
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
            snippet = Snippet(path, i + 1, LANGUAGES[language], "\n".join(body) + "\n")
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            while k >= 0 and lines[k].rstrip().endswith("-->"):  # marker comments right above (one may wrap)
                start = next((j for j in range(k, -1, -1) if "<!--" in lines[j]), k)
                marker = MARKER.match("\n".join(line.strip() for line in lines[start:k + 1]))
                if not marker:
                    break
                snippet.directives[:0] = parse_directives(marker.group(1))
                snippet.marker_line = start + 1
                k = start - 1
            snippets.append(snippet)
        i = end + 1
    return snippets


SNIPPETS = [s for path in DOC_FILES for s in read_snippets(path)]


SERVER_URL = re.compile(r"(127\.0\.0\.1|localhost):8000\b")


def marker_problems(snippet: Snippet) -> list[str]:
    problems = [f"unknown directive {k!r}" for k, _ in snippet.directives if k not in DIRECTIVES]
    if any(snippet.has(key) for key in ("skip", "sub", "omit", "tiny-model")) and not snippet.reason:
        problems.append("skip, sub, omit and tiny-model need reason=\"...\"")
    for value in snippet.values("sub"):
        if " => " not in value or value.split(" => ", 1)[0] not in snippet.code:
            problems.append(f"sub {value!r}: needs the form OLD => NEW, with OLD in the block")
    for text in snippet.values("omit"):
        if text not in snippet.code or snippet.language == "python":
            problems.append(f"omit {text!r}: no shell line of the block holds it")
    if SERVER_URL.search(snippet.code) and not (snippet.has("needs-server") or snippet.has("skip")):
        problems.append("talks to a server on port 8000 but has no needs-server marker (nothing would be listening)")
    return problems


def test_markers_are_valid_and_every_skip_says_why(capsys):
    """Every marker uses the vocabulary above; the skipped and substituted examples are listed with their reasons."""
    problems = {s.name: marker_problems(s) for s in SNIPPETS if marker_problems(s)}
    assert not problems, problems
    assert len(SNIPPETS) > 30 and {s.language for s in SNIPPETS} >= {"python", "shell"}
    with capsys.disabled():
        print()
        for s in SNIPPETS:
            if s.has("skip"):
                print(f"  skipped  {s.name}: {s.reason}")
            elif s.has("sub") or s.has("omit") or s.has("tiny-model"):
                changes = "; ".join((["tiny model"] if s.has("tiny-model") else []) + s.values("sub")
                                    + [f"omit {v!r}" for v in s.values("omit")])
                print(f"  changed  {s.name}: {changes} ({s.reason})")


# ---------------------------------------------------------------- running them

@pytest.fixture(scope="module")
def snippet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("snippets")
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED)  # ../shared from every snippet's directory, as from the repository
    return root


@pytest.fixture(scope="module")
def snippet_env(snippet_root, tiny_model_dir, real_model_dir) -> dict[str, str]:
    """The environment of a reader who installed allmpnet: its command on PATH, the published model, no network."""
    bin_dir = snippet_root / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "allmpnet"  # this tree's CLI under this interpreter, whatever is installed elsewhere
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m allmpnet \"$@\"\n")
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLMPNET_") or k == "ALLMPNET_HOME"}
    python_path = [str(REPO / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(dict.fromkeys(python_path)),
               TINY_MODEL=str(tiny_model_dir), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               MPLBACKEND="Agg")
    return env


@pytest.fixture(scope="module")
def tiny_home(snippet_root, tiny_model_dir) -> Path:
    """An ALLMPNET_HOME in which the tiny random model is all-mpnet-base-v2, stamped as verified weights."""
    from allmpnet.weights import WEIGHTS, published_dir, sha256_of, write_stamp
    home = snippet_root / "tiny-home"
    target = home / published_dir().name
    shutil.copytree(tiny_model_dir, target)
    write_stamp(target, sha256_of(target / WEIGHTS))
    return home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def docs_server(snippet_root, snippet_env):
    """`allmpnet serve` on a free loopback port with the published model and a small index (for /search)."""
    home = snippet_root / "server"
    home.mkdir()
    (home / "corpus.txt").write_text("Plants grow from seeds and need light and water.\n"
                                     "The stock market fell sharply today.\nA recipe for banana bread.\n")
    subprocess.run(["allmpnet", "index", "build", "corpus.txt", "--out", "index"], cwd=home, env=snippet_env,
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(["allmpnet", "serve", "--port", str(port), "--index", "index", "--no-access-log"],
                            cwd=home, env=snippet_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up: " + (home / "server.log").read_text()
            time.sleep(0.3)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def prepared_code(snippet: Snippet, env: dict[str, str], port: int | None) -> str:
    code = snippet.code
    for value in snippet.values("sub"):
        old, new = value.split(" => ", 1)
        code = code.replace(old, new.replace("$TINY_MODEL", env["TINY_MODEL"]))
    if port is not None:
        code = SERVER_URL.sub(rf"\g<1>:{port}", code)
    if snippet.language == "console":
        code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ ")) + "\n"
    if snippet.language != "python" and snippet.values("omit"):
        kept, dropping = [], False
        for line in code.splitlines():
            # a dropped command's continuation lines (after a trailing backslash) go with it
            dropping = dropping or any(text in line for text in snippet.values("omit"))
            if not dropping:
                kept.append(line)
            if not line.rstrip().endswith("\\"):
                dropping = False
        code = "\n".join(kept) + "\n"
    return code


RAN: dict[Path, tuple[Snippet, Path, bool]] = {}  # per file: its last runnable snippet, directory, success


def run_checked(args: list[str], cwd: Path, env: dict[str, str], timeout: float, what: str) -> None:
    try:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} ran past {timeout:.0f} s\n--- stdout\n{e.stdout}\n--- stderr\n{e.stderr}")
    if done.returncode != 0:
        pytest.fail(f"{what} exited with {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n"
                    f"--- stderr\n{done.stderr[-6000:]}")


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, snippet_root, snippet_env, request):
    if snippet.has("skip"):
        pytest.skip(f"{snippet.name}: {snippet.reason}")
    text = snippet.code + " ".join(snippet.values("setup"))
    if "../shared/" in text and not (SHARED / "data").is_dir():
        pytest.skip(f"{snippet.name} reads ../shared/data, which is absent here")
    if snippet.has("continues"):
        previous = RAN.get(snippet.path)
        if previous is None or not previous[2]:
            pytest.skip(f"{snippet.name} continues the block before it, which did not run")
        cwd = previous[1]
    else:
        cwd = snippet_root / re.sub(r"[^\w.-]", "_", snippet.name)
        cwd.mkdir()
        if (REPO / "examples").is_dir():
            (cwd / "examples").symlink_to(REPO / "examples")
    tiny = snippet.has("tiny-model") or (snippet.has("continues") and RAN[snippet.path][0].has("tiny-model"))
    RAN[snippet.path] = (snippet, cwd, False)
    port = request.getfixturevalue("docs_server") if snippet.has("needs-server") else None
    env = dict(snippet_env)
    if tiny:
        env["ALLMPNET_HOME"] = str(request.getfixturevalue("tiny_home"))
    if port is not None:
        # huggingface_hub's InferenceClient refuses any URL offline, the loopback one too (it reads both variables)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            del env[name]
    for command in snippet.values("setup"):
        run_checked(["bash", "-c", command], cwd, env, 60, f"{snippet.name} setup {command!r}")
    code = prepared_code(snippet, env, port)
    if snippet.language == "python":
        script = cwd / f"snippet_{snippet.line}.py"
        script.write_text(code)
        args = [sys.executable, script.name]
    else:
        script = cwd / f"snippet_{snippet.line}.sh"
        # -e: the first failing line fails the block; -x: the log shows which line that was
        script.write_text("set -eo pipefail\nPS4='+ line $LINENO: '\nset -x\n" + code)
        args = ["bash", script.name]
    started = time.monotonic()
    run_checked(args, cwd, env, snippet.timeout, f"{snippet.name} ({snippet.language})\n{code}")
    RAN[snippet.path] = (snippet, cwd, True)
    print(f"{snippet.name}: {time.monotonic() - started:.1f} s")
