"""The README's commands exist: every `cascade …` line in its code blocks parses with the real argument parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cascade.cli.main import SUBCOMMANDS, build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """`cascade …` command lines from the README's fenced code blocks (continuations joined, `&&` chains split)."""
    fenced = re.findall(r"```([\w-]*)\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    commands = []
    for block in (text for language, text in fenced if language in ("", "bash", "sh")):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if "cascade" in words and words[0] in ("cascade", "torchrun"):
                    commands.append(shlex.join(words[words.index("cascade") + 1:]))
    return commands


def test_readme_has_commands_for_every_subcommand() -> None:
    used = {shlex.split(c)[0] for c in readme_commands() if c}
    assert set(SUBCOMMANDS) <= used, f"README shows no example of: {sorted(set(SUBCOMMANDS) - used)}"


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command: str) -> None:
    parser = build_parser()
    argv = shlex.split(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"README command does not parse (exit {exit_.code}): cascade {command}")
    if getattr(args, "config", None):  # a shipped name must resolve to a shipped file
        from cascade.stages.config import find_config

        assert find_config(args.config).is_file()
