"""The serve commands the README and docs/ show use flags and presets that exist.

Every `jaxserve serve ...` command in a fenced code block of README.md and docs/*.md (continuation
lines joined, `docker run ... jaxserve:TAG ARGS` included, whose ARGS go to `jaxserve serve`) is
checked against the CLI parser: every `--flag` must be an option of `jaxserve serve`, a
`--config NAME` must be a packaged preset, and a concrete command (no `[optional]` synopsis)
must parse as a whole.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from jaxserve.entrypoints.cli import build_parser
from jaxserve.presets import preset_names

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def serve_commands(text: str) -> list[str]:
    """The argument strings of every serve command in the fenced code blocks of a Markdown text."""
    out, block, language = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if block is None:
                block, language = [], line[3:].strip()
            else:
                if language in ("", "bash", "sh", "console"):
                    out += _commands_in("\n".join(block))
                block = None
        elif block is not None:
            block.append(line)
    return out


def _commands_in(shell: str) -> list[str]:
    out = []
    for line in shell.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0]
        found = re.search(r"\bjaxserve serve\b(.*)", line) or re.search(r"docker run .*? jaxserve:\w+(.*)", line)
        if found:
            command = found.group(1).strip()
            out.append(command[:-1] if command.count("'") % 2 else command)  # the end of gcloud's --command='...'
    return out


def _words(command: str) -> list[str]:
    command = re.sub(r'"\$\([^)]*\)"', "SECRET", command)  # "$(openssl rand -hex 16)"
    return shlex.split(command)


COMMANDS = [(doc.relative_to(ROOT).as_posix(), cmd) for doc in DOCS for cmd in serve_commands(doc.read_text())]


def test_the_docs_show_serve_commands():
    files = {doc for doc, _ in COMMANDS}
    assert {"README.md", "docs/tpu.md", "docs/containers.md"} <= files, files


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{i}" for i, (d, _) in enumerate(COMMANDS)])
def test_serve_command_in_docs_uses_flags_that_exist(doc, command):
    parser = serve_parser()
    words = _words(command)
    synopsis = "[" in command
    tokens = [w.strip("[]") for w in words]
    for token in tokens:
        if token.startswith("-") and token not in ("-", "--"):
            flag = token.split("=", 1)[0]
            assert flag in parser._option_string_actions, f"{doc}: `jaxserve serve {flag}` does not exist"
    if "--config" in tokens:
        value = tokens[tokens.index("--config") + 1]
        if "/" not in value and not value.endswith(".yaml"):
            assert value in preset_names(), f"{doc}: no preset named {value!r}"
    if not synopsis:
        try:
            parser.parse_args(words)
        except SystemExit as e:
            pytest.fail(f"{doc}: `jaxserve serve {command}` does not parse (exit {e.code})")
