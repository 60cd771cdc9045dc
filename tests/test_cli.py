"""Every command answers --help with its own options, the dispatcher rejects unknown commands, and the
installed entry points (pyproject's [project.scripts]) and the repository's scripts run."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpa_tf.__main__ import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]

#: an option only that command has: the help shown is the command's own, not another's
OWN_OPTION = {
    "demo": "--quick", "synthetic": "--cell-dropout", "segment": "--overlay-size", "build": "--shard-mb",
    "verify": "--sample", "train": "--val-fold", "predict": "--image-weight", "metric": "--iou",
    "download": "--include-trainset", "kit": "--wheels-from",
}


def test_every_command_is_covered():
    assert set(OWN_OPTION) == set(COMMANDS) | {"verify"}


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
    assert all(name in out for name in COMMANDS)
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


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
