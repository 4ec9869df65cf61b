"""The README and docs/ say only what works: every `recserve` command they show
parses (flags and sub-commands as written), every `make` target and bench
script they name exists, every Python block compiles, every link resolves, and
the README stays a front page."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from recserve.cli import build_parser
from recserve.clients.bench import build_parser as bench_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z_]*(?::[A-Z]+)?|\.\.\.)$")  # DIR, HOST:PORT, ...
DUMMY = {"HOST:PORT": "localhost:50051", "N": "2", "QPS": "100"}


def shell_lines(text: str) -> list[str]:
    """Commands of the sh blocks (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def block_commands(text: str) -> list[str]:
    """Complete `recserve ...` commands of the sh blocks."""
    found = []
    for line in shell_lines(text):
        m = re.search(r"(?:^|\s|/)recserve (.*)$", line)
        if m:
            found.append("recserve " + m.group(1))
    return found


def argv_of(command: str) -> list[str] | None:
    """The arguments of a documented command, templates filled in: optional parts
    dropped, a choice list takes its first choice; None when it elides arguments."""
    command = re.sub(r"\[[^\]]*\]", " ", command)
    command = re.sub(r"(\S+?)\|\S*", r"\1", command)
    args = shlex.split(command)[1:]
    if "..." in args:
        return None
    return [DUMMY.get(a, "x" if PLACEHOLDER.match(a) else a) for a in args]


def sub_parser(words: list[str]):
    """The parser a sub-command path leads to, and the words after the path."""
    parser = build_parser()
    while words:
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs or words[0] not in subs[0].choices:
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    if parser.prog == "recserve bench":
        parser = bench_parser()
    return parser, words


def commands(kind) -> list[tuple[str, str]]:
    return [(p.name, c) for p in PAGES for c in kind(p.read_text())]


def inline_commands(text: str) -> list[str]:
    return re.findall(r"`(recserve [^`]+)`", text)


def test_the_documented_commands_are_found():
    assert len(commands(block_commands)) >= 8
    assert len(commands(inline_commands)) >= 8


@pytest.mark.parametrize(("page", "command"), commands(block_commands))
def test_every_documented_recserve_command_parses(page, command, capsys):
    argv = argv_of(command)
    if argv is None:
        pytest.skip(f"{page}: {command!r} elides its arguments")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "bench":
            bench_parser().parse_args(args.bench_args)
    except SystemExit as exc:
        if exc.code:
            err = capsys.readouterr().err
            raise AssertionError(f"{page}: `{command}` does not parse: {err}") from None


@pytest.mark.parametrize(("page", "command"), commands(inline_commands))
def test_every_recserve_command_named_in_text_exists_with_its_flags(page, command):
    """An inline `recserve sub [--flag ...]` names a real sub-command path, and
    every flag it shows is one of that sub-command's options."""
    argv = argv_of(command) or shlex.split(re.sub(r"\[|\]", " ", command))[1:]
    words = [w for w in argv if not w.startswith("-")]
    parser, _ = sub_parser(words[:2])
    assert parser.prog != "recserve" or not argv, f"{page}: `{command}`: no such sub-command"
    known = {o for a in parser._actions for o in a.option_strings}
    flags = [w.split("=")[0] for w in argv if w.startswith("--")]
    assert set(flags) <= known, f"{page}: `{command}`: unknown {set(flags) - known}"


def test_make_targets_and_scripts_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"(?:^|`|\s)make ([a-z][\w-]*)", text, re.M):
            assert target in targets, f"{page.name}: make {target}"
        for script in re.findall(r"\b(bench/[\w.-]+\.py)", text):
            assert (ROOT / script).is_file(), f"{page.name}: {script}"
        for path in re.findall(r"`((?:server|kernels|clients|tests|deploy|proto)/[\w./-]+)`", text):
            assert (ROOT / path).exists() or path.startswith("server/v1"), f"{page.name}: {path}"


def test_python_blocks_compile_and_links_resolve():
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            compile(block, str(page), "exec")
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: link {target}"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    first = "\n".join(lines[:6])
    assert "make serve" in first and "make test" in first
