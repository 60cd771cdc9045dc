"""Every command answers --help with its own options, the dispatcher rejects unknown commands, and the
installed entry points (pyproject's [project.scripts]) and the repository's scripts run."""

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpa_tf.__main__ import COMMANDS, main, parser_of

ROOT = Path(__file__).resolve().parents[1]

#: an option only that command has: the help shown is the command's own, not another's
OWN_OPTION = {
    "demo": "--quick", "synthetic": "--cell-dropout", "segment": "--overlay-size", "build": "--shard-mb",
    "verify": "--sample", "train": "--val-fold", "predict": "--image-weight", "metric": "--iou",
    "download": "--include-trainset", "kit": "--wheels-from",
}


def test_every_command_is_covered():
    assert set(OWN_OPTION) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(OWN_OPTION))
def test_every_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert OWN_OPTION[command] in out
    others = {o for c, o in OWN_OPTION.items() if c != command and o != OWN_OPTION[command]}
    assert not [o for o in others if f"{o} " in out or f"{o}\n" in out], command


def test_top_level_help_and_unknown_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  (\w+) ", out, re.M)
    assert listed == list(COMMANDS) and "verify" in listed
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(command):
    """Each option of each command says what it does, and one with a default shows it."""
    parser = parser_of(command)
    assert _options(parser)
    for action in _options(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help is not argparse.SUPPRESS and action.help.strip(), f"{command} {name}: no help"
        has_default = action.default not in (None, False, argparse.SUPPRESS) and not action.required
        if has_default and action.option_strings:
            assert "default" in (action.help % vars(action)).lower(), f"{command} {name}: default not shown"
    text = parser.format_help()
    assert "``" not in text, f"{command} --help shows reStructuredText marks"
    assert text.startswith(f"usage: python -m hpa_tf {command} "), text.splitlines()[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_argument_errors_name_the_command_as_it_was_run(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--no-such-option"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m hpa_tf {command}: error: " in err, err
    assert "Traceback" not in err


def test_help_of_the_commands_states_no_running_times(capsys):
    """Durations depend on the machine: --help leaves them to the README's measured figures."""
    for command in COMMANDS:
        text = parser_of(command).format_help()
        assert not re.search(r"\b(about|under|in) \d+ (seconds|minutes|s|min)\b", text), command


def _scripts(text: str) -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml (name = "module:function" lines; tomllib is 3.11+)."""
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S).group(1)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, re.M))


def test_entry_points_are_package_modules_that_answer_help(capsys):
    text = (ROOT / "pyproject.toml").read_text()
    scripts = _scripts(text)
    assert {"hpa-tf", "hpa-tf-train", "hpa-tf-predict"} <= set(scripts)
    assert "py-modules" not in text  # no top-level modules (train_tpu, predict) in site-packages
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module.startswith("hpa_tf."), target
        entry = getattr(importlib.import_module(module), func)
        if name == "hpa-tf":
            assert entry(["--help"]) == 0
            continue
        with pytest.raises(SystemExit) as e:
            entry(["--help"])
        assert e.value.code == 0
        assert {"hpa-tf-train": "--val-fold", "hpa-tf-predict": "--test-dir"}[name] in capsys.readouterr().out


@pytest.mark.parametrize("script, option", [("train_tpu.py", "--val-fold"), ("predict.py", "--test-dir")])
def test_repository_scripts_run_the_package_command_lines(script, option):
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert option in done.stdout and "(default:" in done.stdout


def test_tensorflow_commands_print_no_cuda_probe_noise(tmp_path):
    """A TensorFlow command on a machine without CUDA: no ``failed call to cuInit`` line, just the
    command's own one-line error (the command lines set TF_CPP_MIN_LOG_LEVEL before TF starts)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "hpa_tf", "train", "--data", str(tmp_path / "none"), "--out",
                           str(out), "--strategy", "cpu", "--backbone", "tiny_cnn"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert "cuInit" not in done.stderr and "E0000" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error:" in line or "Traceback" in line]
    assert errors == [f"python -m hpa_tf train: error: {tmp_path / 'none'}: no such file or folder"], done.stderr
    assert not out.exists()


def test_quiet_tensorflow_sets_the_level_unless_the_user_did(monkeypatch):
    import os

    from hpa_tf.cli import quiet_tensorflow

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    assert quiet_tensorflow() in ("2", "3") and os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("2", "3")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert quiet_tensorflow() == "0"
