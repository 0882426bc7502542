"""Every snippet in README.md and docs/*.md runs as printed.

Python blocks run each in a fresh interpreter namespace (a block with `def test_...` runs under
pytest); TOML blocks load and play as scenarios; shell commands (indented blocks, ```sh blocks,
`$ ` lines of console blocks) run through bash in a scratch directory holding `examples/`, the
doc's named TOML files and `.venv` (this interpreter's environment), exactly as a user types them.
A command's expected exit code is 0 unless its comment says `(exit N)`.

Each doc is one test: its snippets run in order in one scratch checkout, as a reader follows
them. What is not run is printed with the reason (`pytest -s` shows it):
- the install line, `apt-get`, and the test-suite commands (this suite is what they run);
- the cross-assembler commands of docs/guests.md when the aarch64 binutils are missing;
- synopsis lines (placeholders such as `NAME` or `[--opt ...]`): their options are checked
  against the command's `--help` instead.
Snippets that need the real kernels run only under the `conform` marker, those that need
Debian's Linux kernel only under `linux`; the offline suite deselects them by marker, never
skips them silently. The docs must also stand alone: no citation of the project's internal
reference, which a user's clone does not have.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent
SHELL_LANGS = ("", "sh", "bash", "shell", "console")
COMMAND = re.compile(r"^(?:printf .*\| )?(?:\.venv/bin/)?(pkvm|python3?|pip|lint-imports|ruff|"
                     r"apt-get|aarch64-linux-gnu-\w+)\b")
SYNOPSIS = re.compile(r"\[--|\.\.\.\]?$|(?<![\w.])(?:NAME|FILE|SCENARIO|IMAGE|N|S)(?![\w.])|"
                      r"latest\|6\.12")
NOT_RUN = {  # what a command starts with -> why it is not run here
    "python3 -m venv": "the install: this test runs inside that install",
    ".venv/bin/pip": "the install: this test runs inside that install",
    "PKVM_PURE=1 .venv/bin/pip": "the install: this test runs inside that install",
    "PKVM_PURE=1 .venv/bin/python -m pytest": "runs the test suite itself",
    ".venv/bin/lint-imports": "runs the test suite itself",
    ".venv/bin/ruff": "runs the test suite itself",
    ".venv/bin/mypy": "runs the test suite itself",
    ".venv/bin/python -m pytest": "runs the test suite itself",
    "apt-get": "installs system packages (needs root and the network)",
}
INTERNAL_REFERENCE = re.compile(r"\.\./shared|shared/spec|\bmemory\.md\b|\bvm-state\.md\b|"
                                r"\brun-and-check\.md\b|\bsmc\.md\b|§")
PENDING_STAND_ALONE: dict[str, str] = {}  # doc name -> why it may cite the internal reference


@dataclass
class Snippet:
    doc: Path
    line: int
    kind: str  # "python", "toml", "shell", "file" (a named block written out, e.g. hi.S)
    text: str
    name: str | None = None  # a TOML or assembly block's file name, from its first comment

    @property
    def id(self) -> str:
        return f"{self.doc.name}:{self.line}"

    @property
    def needs(self) -> str | None:
        """'conform' or 'linux' when it needs the real kernels or Debian's Linux."""
        t = self.text
        if "conform" in t and ("pkvm conform" in t or "pkvm.conform" in t):
            return "conform"
        if "fetch-linux" in t or ".cache/pkvm/linux" in t or "$D/Image" in t:
            return "linux"
        return None


def snippets(doc: Path) -> list[Snippet]:
    """The code of one markdown file: fenced blocks by language, and indented blocks."""
    out: list[Snippet] = []
    env: list[str] = []  # shell assignments (D=...) carry on to later blocks, as in one shell
    lines = doc.read_text().splitlines()
    i = 0
    prev_blank = True
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            lang, start = fence.group(1), i + 1
            j = start
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            body = lines[start:j]
            if lang in ("python", "toml", "asm"):
                first = body[0] if body else ""
                name = re.match(r"^(?:#|//)\s*([\w.-]+\.(?:toml|S))\b", first)
                kind = "file" if lang == "asm" else lang
                out.append(Snippet(doc, start + 1, kind, "\n".join(body) + "\n",
                                   name.group(1) if name else None))
            elif lang in SHELL_LANGS:
                out += _commands(doc, start, body, any(b.startswith("$ ") for b in body), env)
            i, prev_blank = j + 1, False
            continue
        if line.startswith("    ") and (prev_blank or lines[i - 1].startswith("```")):
            j = i
            while j < len(lines) and lines[j].startswith("    "):
                j += 1
            out += _commands(doc, i, [x[4:] for x in lines[i:j]], False, env)
            i, prev_blank = j, False
            continue
        prev_blank = not line.strip()
        i += 1
    return out


def _commands(doc: Path, start: int, body: list[str], prompts: bool,
              env: list[str]) -> list[Snippet]:
    """Shell commands of a block (with `$ ` prompts, only the prompted lines); `D=...`
    assignments (kept in `env`) are carried into the commands after them."""
    out = []
    for k, text in enumerate(body):
        if prompts and not text.startswith("$ "):
            continue
        text = text.removeprefix("$ ").strip()
        if re.match(r"^[A-Z]=\S+$", text.split("#")[0].strip()):
            env.append(text.split("#")[0].strip())
            continue
        if not COMMAND.match(text):
            continue
        out.append(Snippet(doc, start + k + 1, "shell", "; ".join([*env, text])))
    return out


ALL = [s for d in DOCS for s in snippets(d)]
CROSS = "aarch64-linux-gnu-"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's checkout: examples/, guests/, .venv (this environment)."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copytree(ROOT / "guests", tmp_path / "guests")
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)  # the venv itself: its pyvenv.cfg too
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_docs_have_snippets():
    kinds = {k: sum(s.kind == k for s in ALL) for k in ("python", "toml", "shell")}
    assert kinds["python"] >= 6 and kinds["toml"] >= 2 and kinds["shell"] >= 20, kinds


PENDING_SNIPPETS: dict[str, str] = {}  # doc name -> why its snippets cannot run yet


def _doc_params(marker: str | None):
    out = []
    for d in DOCS:
        mine = [s for s in ALL if s.doc == d and s.needs == marker and s.kind != "file"]
        if mine:
            marks = [getattr(pytest.mark, marker)] if marker else []
            if d.name in PENDING_SNIPPETS and marker is None:
                marks.append(pytest.mark.skip(reason=PENDING_SNIPPETS[d.name]))
            out.append(pytest.param(d, id=d.name, marks=marks))
    return out


def _run_doc(doc: Path, marker: str | None, where: Path) -> list[str]:
    """Run the doc's snippets (those needing `marker`) in order, as a reader would; the doc's
    named files (TOML scenarios, assembly) are written first. Returns what went wrong, and the
    snippets not run with why (printed)."""
    for s in snippets(doc):
        if s.name:
            (where / s.name).write_text(s.text)
    problems, not_run = [], []
    for s in snippets(doc):
        if s.needs != marker or s.kind == "file":
            continue
        why = _not_run(s) if s.kind == "shell" else None
        if why:
            not_run.append(f"{s.id}: {why}")
            continue
        try:
            {"python": _python, "toml": _toml, "shell": _shell}[s.kind](s, where)
        except Exception as e:  # noqa: BLE001 (collect every snippet's failure, then fail)
            problems.append(f"{s.id}: {type(e).__name__}: {e}")
    for line in not_run:
        print(f"not run: {line}")
    return problems


@pytest.mark.parametrize("doc", _doc_params(None))
def test_doc_snippets_run(doc: Path, workdir: Path):
    problems = _run_doc(doc, None, workdir)
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("doc", _doc_params("conform"))
def test_doc_snippets_on_the_real_kernels_run(doc: Path, workdir: Path):
    problems = _run_doc(doc, "conform", workdir)
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("doc", _doc_params("linux"))
def test_doc_snippets_with_debian_linux_run(doc: Path, workdir: Path):
    problems = _run_doc(doc, "linux", workdir)
    assert not problems, "\n\n".join(problems)


# -- one snippet ---------------------------------------------------------------------------------
def _python(s: Snippet, where: Path) -> None:
    if re.search(r"^def test_", s.text, re.M):  # a test file: run it under pytest
        (where / "test_snippet.py").write_text(s.text)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "test_snippet.py"], cwd=where, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0 and " passed" in r.stdout, r.stdout + r.stderr
        return
    exec(compile(s.text, s.id, "exec"), {"__name__": "__snippet__"})


def _toml(s: Snippet, where: Path) -> None:
    from pkvm import scenario

    result = scenario.loads(s.text, s.id).run()
    assert result.ok, [(f.index + 1, f.expected, f.detail) for f in result.failures]


def _not_run(s: Snippet) -> str | None:
    """Why none of the command's `&&` parts is run here, or None."""
    parts = [p.strip() for p in s.text.split("; ")[-1].split("&&")]
    whys = [next((w for k, w in NOT_RUN.items() if p.startswith(k)), None) for p in parts]
    if all(whys):
        return whys[0]
    if CROSS in s.text and shutil.which(CROSS + "as") is None:
        return f"needs the {CROSS} binutils (apt-get install binutils-aarch64-linux-gnu)"
    return None


def _runnable_parts(text: str) -> str:
    """Drop the install steps of `a && b && c` (this test runs inside that install)."""
    parts = [p.strip() for p in text.split("&&")]
    return " && ".join(p for p in parts if not any(p.startswith(k) for k in NOT_RUN))


def _shell(s: Snippet, where: Path) -> None:
    text = _runnable_parts(s.text)
    command = text.split("; ")[-1]
    if command.startswith(("pkvm", ".venv/bin/pkvm")) and SYNOPSIS.search(command.split("#")[0]):
        _check_synopsis(shlex.split(command, comments=True))
        return
    comment = command.split("#", 1)[1] if "#" in command else ""
    want = int(m.group(1)) if (m := re.search(r"\(exit (\d)\)", comment)) else 0
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="100")
    r = subprocess.run(["bash", "-c", text], cwd=where, env=env, capture_output=True,
                       text=True, timeout=1800, input="uname -a\npoweroff -f\n")
    assert r.returncode == want, f"{text}: exit {r.returncode}, not {want}\n" \
                                 f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr


def _check_synopsis(words: list[str]) -> None:
    """A synopsis line: the command exists and has every option it names."""
    from typer.testing import CliRunner

    from pkvm.cli.main import app

    words = [w.removeprefix(".venv/bin/") for w in words]
    assert words[0] == "pkvm", words
    r = CliRunner().invoke(app, [words[1], "--help"])
    assert r.exit_code == 0, r.output
    for opt in re.findall(r"--[a-z][\w-]*", " ".join(words)):
        assert opt in r.output, f"{opt} is not an option of pkvm {words[1]}"


# -- standing alone -----------------------------------------------------------------------------
@pytest.mark.parametrize("doc", [
    pytest.param(d, id=d.name, marks=[pytest.mark.skip(reason=PENDING_STAND_ALONE[d.name])]
                 if d.name in PENDING_STAND_ALONE else []) for d in DOCS])
def test_docs_stand_alone(doc: Path):
    """No citation of the internal reference a user's clone lacks; links resolve."""
    text = doc.read_text()
    bad = [(n + 1, line) for n, line in enumerate(text.splitlines())
           if INTERNAL_REFERENCE.search(line)]
    assert not bad, bad
    for target in re.findall(r"\]\(([^)#:]+\.md)\)", text):
        assert (doc.parent / target).is_file(), f"{doc.name} links to missing {target}"
