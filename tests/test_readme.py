"""The README's promises: its code runs, and CI runs its test command verbatim."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_python_example_runs():
    blocks = _blocks("python")
    assert blocks, "the README must show how to use eqdisp from Python"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command_verbatim():
    commands = [line for block in _blocks("bash") for line in block.strip().splitlines()]
    test_command = next(c for c in commands if c.endswith("pytest"))
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_readme_main_command_uses_a_real_preset():
    from eqdisp.config import PRESETS

    commands = [line for block in _blocks("bash") for line in block.strip().splitlines()]
    main = next(c for c in commands if "cli.train" in c)
    preset = main.split("cli.train")[1].split()[0]
    assert preset in PRESETS
