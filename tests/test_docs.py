"""The documentation names only what exists: every `tunefleet ...` command line in README.md and docs/*.md is a
real command with real options (checked against the click tree of the Typer app), and every repository path
they mention (`examples/...`, `docs/...`, `service/...`, relative links) is there."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from tunefleet.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Known mistakes in docs that must wait for their owners, as (file relative to the root, command or path as
# written), e.g. ("docs/ops.md", "examples/old.yaml"); each with its fix noted where it was reported. Skipped
# by the checks below until fixed; then remove the entry (test_known_to_fix_lists_only_real_problems insists).
# Empty: when this test was written the only mistakes were in docs/cli.md, which was fixed with it.
KNOWN_TO_FIX: set[tuple[str, str]] = set()

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Blocks in these languages hold code or data, not command lines.
_NOT_SHELL = {"python", "py", "json", "yaml", "yml", "toml", "sql", "html"}
# Tokens that end a command: shell punctuation, and the elisions the docs use.
_STOP = {"(", ")", "|", "||", ";", "&", "&&", ">", ">>", "<", "...", "…"}


def _rel(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


# -- command lines ------------------------------------------------------------------------------------


def _shell_lines(text: str) -> Iterator[str]:
    """Lines of shell code blocks (backslash continuations joined, `$ ` prompts dropped) and inline code."""
    for lang, body in _FENCE.findall(text):
        if lang.lower() in _NOT_SHELL:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            yield line.strip().removeprefix("$ ")
    for span in _INLINE.findall(_FENCE.sub("", text)):
        yield span.strip()


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in an output line: split on spaces instead
        return line.split()


def _commands(line: str) -> Iterator[list[str]]:
    """The argument lists after each `tunefleet` that starts a command in `line`: first word (after
    VAR=value assignments) or first word after `$(`, `|`, `;` or `&&`."""
    tokens = _tokens(line)
    start = True
    for i, token in enumerate(tokens):
        if start and token == "tunefleet":
            args = []
            for arg in tokens[i + 1:]:
                if arg in _STOP or arg.endswith("..."):
                    break
                args.append(arg)
            yield args
        if token in _STOP:
            start = True
        elif not (start and _ASSIGNMENT.match(token)):
            start = False


# Typer ships its own copy of click, so commands and parameters are told apart by attributes, not classes.


def _option(command: Any, name: str) -> Any:
    for param in command.params:
        if param.param_type_name == "option" and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def command_problem(args: list[str]) -> str | None:
    """Why `tunefleet <args>` is not a valid command line (unknown command, option, extra argument), or None.

    Values are not checked: the docs write placeholders (`ID`, `URL`, `$T`) where values go.
    """
    command: Any = typer.main.get_command(app)
    path, positionals, i = "tunefleet", 0, 0
    while i < len(args):
        arg = args[i]
        if arg == "--":  # what follows is another program's command line (`tunefleet agent -- python x.py`)
            return None
        if arg.startswith("-") and arg != "-":
            name = arg.split("=", 1)[0]
            if name == "--help":
                return None
            option = _option(command, name)
            if option is None:
                return f"`{path}` has no option {name}"
            takes_value = not (option.is_flag or option.count) and "=" not in arg
            i += 2 if takes_value else 1
            continue
        if hasattr(command, "commands"):  # a group: the next word names a subcommand
            if arg.isupper():  # a placeholder such as COMMAND
                return None
            if arg not in command.commands:
                return f"`{path}` has no command {arg!r}"
            command, path = command.commands[arg], f"{path} {arg}"
        else:
            positionals += 1
            arguments = [p for p in command.params if p.param_type_name == "argument"]
            if positionals > sum(max(p.nargs, 1) for p in arguments) and not any(p.nargs < 0 for p in arguments):
                return f"`{path}` takes {len(arguments)} argument(s), got extra {arg!r}"
        i += 1
    return None


def _documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for line in _shell_lines(doc.read_text(encoding="utf-8")):
            for args in _commands(line):
                found.append((_rel(doc), " ".join(["tunefleet", *args]), args))
    return found


def test_the_docs_show_commands() -> None:
    commands = {cmd for _, cmd, _ in _documented_commands()}
    assert {"tunefleet db upgrade", "tunefleet study pause 4"} <= commands  # the scan sees docs/cli.md
    assert any(doc == "README.md" for doc, _, _ in _documented_commands())


@pytest.mark.parametrize(("args", "problem"), [
    (["study", "create", "x.yaml", "--wait", "-q"], None),
    (["--server", "URL", "study", "ls", "--state", "running"], None),
    (["worker", "--gpus", "all", "--once"], None),
    (["study", "watch", "4"], "has no command 'watch'"),
    (["study", "ls", "--all"], "has no option --all"),
    (["study", "show", "4", "5"], "extra '5'"),
    (["token", "create", "--name", "x", "--role=admin"], None),
    (["agent", "--grace", "3", "--", "python", "train.py", "--lr", "{lr}"], None),
    (["agent", "--lr", "3", "--", "python"], "has no option --lr"),
])
def test_the_checker_itself(args: list[str], problem: str | None) -> None:
    found = command_problem(args)
    assert found is None if problem is None else problem in (found or "")


def test_every_documented_command_exists() -> None:
    problems = [f"{doc}: {cmd}: {problem}" for doc, cmd, args in _documented_commands()
                if (problem := command_problem(args)) and (doc, cmd) not in KNOWN_TO_FIX]
    assert not problems, "\n".join(problems)


# -- paths ----------------------------------------------------------------------------------------------


def _top_level_dirs() -> set[str]:
    return {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
            and not p.name.endswith(".egg-info")}


def _mentioned_paths(doc: Path) -> Iterator[tuple[str, Path]]:
    """(as written, resolved) for each repository path in `doc`: paths that start with a top-level folder
    (`examples/bbc-lora.yaml`, `service/spec.py`, `docs/img/`) and relative link targets.

    In prose a path needs a file extension, a trailing slash or two slashes ("examples/s" is a rate, not a
    path); a whole inline code span that starts with a folder is a path whatever its shape.
    """
    text = doc.read_text(encoding="utf-8")
    folders = "|".join(sorted(map(re.escape, _top_level_dirs())))
    spans = set(_INLINE.findall(text))
    # Not after a word, a dot or a slash: `.tunefleet/work` and `http://host/docs` are not repository paths.
    for match in re.finditer(rf"(?<![\w./-])((?:{folders})/(?:[\w./-]*[\w/])?)", text):
        path = match.group(1)
        if re.search(r"\.\w+$|/$", path) or path.count("/") > 1 or path in spans:
            yield path, ROOT / path
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = target.split("#", 1)[0]
        yield target, (doc.parent / path)


def test_every_mentioned_path_exists() -> None:
    missing = [f"{_rel(doc)}: {written}" for doc in DOCS for written, path in _mentioned_paths(doc)
               if not path.exists() and (_rel(doc), written) not in KNOWN_TO_FIX]
    assert not missing, "\n".join(missing)


def test_examples_named_in_the_docs_exist() -> None:
    named = {written for doc in DOCS for written, _ in _mentioned_paths(doc) if written.startswith("examples/")}
    assert "examples/bbc-lora.yaml" in named  # the scan sees the README's quick start
    assert all((ROOT / name).exists() for name in named), sorted(n for n in named if not (ROOT / n).exists())


def test_known_to_fix_lists_only_real_problems() -> None:
    """An entry that no longer fails must leave KNOWN_TO_FIX, so the list cannot hide a fixed mistake."""
    failing = {(doc, cmd) for doc, cmd, args in _documented_commands() if command_problem(args)}
    failing |= {(_rel(doc), written) for doc in DOCS for written, path in _mentioned_paths(doc)
                if not path.exists()}
    assert failing >= KNOWN_TO_FIX, sorted(KNOWN_TO_FIX - failing)
