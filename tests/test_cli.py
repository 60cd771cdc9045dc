"""Every command answers --help, and the dispatcher rejects unknown commands."""

import pytest

from hpa_tf.__main__ import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS) + ["verify"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_top_level_help_and_unknown_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err
