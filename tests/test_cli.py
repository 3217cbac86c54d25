"""The `tensorar` console script."""

from __future__ import annotations

import pytest

from tensorar_plugin import __version__
from tensorar_plugin.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: tensorar" in capsys.readouterr().out
