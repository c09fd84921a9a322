"""Every command of docs/troubleshooting.md runs, against a real server."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from pgwarden.cli import main

DOC = Path(__file__).parents[2] / "docs" / "troubleshooting.md"


def doc_commands() -> list[str]:
    """The `pgwarden ...` lines of the page's sh blocks (pipes cut off)."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [
        line.split("|")[0].strip() for line in lines if line.startswith("pgwarden ")
    ]


def test_the_page_has_commands_for_each_situation() -> None:
    commands = doc_commands()
    assert len(commands) >= 7
    assert {shlex.split(c)[1] for c in commands} == {
        "status",
        "kill-idle",
        "queries",
        "tune",
    }


@pytest.mark.parametrize("command", doc_commands())
def test_documented_command_runs(command: str, dsn: str) -> None:
    # Something for the commands to find: a session idle in its transaction.
    with psycopg.connect(dsn, application_name="forgotten") as idle:
        idle.execute("SELECT 1")
        args = [*shlex.split(command)[1:], "--dsn", dsn]
        result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 1), result.output
    assert result.output.strip()
    assert "Traceback" not in result.output
    if "--json" in args:
        assert result.output.lstrip().startswith("{")
