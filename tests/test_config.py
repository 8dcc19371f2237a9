"""Configs: paper defaults, block resolution, presets, the command line and its one-line errors."""

import subprocess
import sys

import pytest

from eqdisp.config import (
    DISP_PRESETS,
    PRESETS,
    ConfigError,
    DispConfig,
    ExperimentConfig,
    OptimConfig,
    RunConfig,
    SamplerConfig,
    resolve_blocks,
)


def test_paper_defaults():
    disp = DispConfig()
    assert (disp.variant, disp.weight, disp.tau, disp.group_size) == ("infonce_l2", 0.5, 0.5, 16)
    assert disp.block_indices(12) == (2,)  # block 3 of SiT-B/2, 1-based
    optim = OptimConfig()
    assert (optim.lr, optim.b1, optim.b2, optim.weight_decay, optim.ema_decay) == (
        1e-4, 0.9, 0.95, 0.0, 0.9999,
    )
    sampler = SamplerConfig()
    assert (sampler.mode, sampler.ode_method, sampler.steps) == ("ode", "heun", 250)
    assert (sampler.last_step, sampler.last_step_size) == ("Mean", 0.04)


def test_reference_pytorch_preset():
    ref = DISP_PRESETS["reference-pytorch"]
    assert (ref.weight, ref.tau, ref.group_size) == (0.25, 1.0, 32)
    assert ref.block_indices(12) == (11,) and ref.block_indices(28) == (27,)


@pytest.mark.parametrize(
    "spec, depth, expected",
    [("quarter", 12, (2,)), ("quarter", 24, (5,)), ("quarter", 28, (6,)), ("last", 6, (5,)),
     ("all", 3, (0, 1, 2)), ("3", 12, (2,)), ("6,3", 12, (2, 5)), ("1,1", 4, (0,))],
)
def test_resolve_blocks(spec, depth, expected):
    assert resolve_blocks(spec, depth) == expected


@pytest.mark.parametrize("spec", ["0", "-1", "three", "", "13"])
def test_bad_blocks_name_the_value(spec):
    with pytest.raises(ConfigError, match="disp.blocks"):
        resolve_blocks(spec, 12)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: DispConfig(tau=0.0), "disp.tau"),
        (lambda: DispConfig(group_size=0), "disp.group_size"),
        (lambda: OptimConfig(b2=1.0), "optim.b2"),
        (lambda: SamplerConfig(steps=1), "sampler.steps"),
        (lambda: ExperimentConfig(train=RunConfig(batch_size=24)), "disp.group_size"),
        (lambda: ExperimentConfig(disp=DispConfig(blocks="13")), "disp.blocks"),
    ],
)
# (Wrong Literal values are caught first by the runtime type checker in tests, and by tyro on the
# command line; ``_check_choice`` is the guard for code that builds configs without either.)
def test_bad_values_give_one_line_errors(make, field):
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert message.startswith(field) and "\n" not in message


def test_presets_cover_the_paper_sizes():
    for size in ("s", "b", "l", "xl"):
        for patch in (2, 4, 8):
            _, cfg = PRESETS[f"sit-{size}{patch}"]
            assert cfg.train.batch_size == 256 and cfg.disp == DispConfig()
    _, b2 = PRESETS["sit-b2"]
    assert b2.model.name == "SiT-B/2" and b2.disp.block_indices(12) == (2,)


def test_cli_overrides_nested_fields():
    import tyro

    cfg = tyro.extras.overridable_config_cli(
        PRESETS, args=["sit-b2", "--disp.variant", "hinge", "--disp.blocks", "all", "--optim.lr", "3e-4"]
    )
    assert cfg.disp.variant == "hinge" and cfg.disp.blocks == "all" and cfg.optim.lr == 3e-4
    assert cfg.model.name == "SiT-B/2"


def test_cli_bad_value_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "cli.train", "sit-tiny", "--disp.tau", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "disp.tau=-1.0" in result.stderr


def test_config_imports_nothing_of_eqdisp_but_its_errors_and_each_module_imports_first():
    """No import circle through the config: `eqdisp.config` imports no other eqdisp module (it
    decodes model names itself), and each of the modules that once depended on import order
    imports first in a fresh interpreter."""
    import ast
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    tree = ast.parse((repo / "eqdisp" / "config.py").read_text())
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert relative == [], [ast.unparse(n) for n in relative]
    for module in ("eqdisp.models", "eqdisp.config", "eqdisp.objective", "eqdisp.families"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {module}"], cwd=repo, capture_output=True, text=True
        )
        assert proc.returncode == 0, (module, proc.stderr[-1000:])
