"""What a study is: arms x seeds under one fixed protocol, and the built-in studies."""

import contextlib
import dataclasses
import io
import pathlib

from eqdisp.config import PRESETS, ExperimentConfig

from .._errors import AnalysisError


@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of a study: `cli.train` options on top of the protocol's preset."""

    name: str
    """Directory name and table row (letters, digits, ``-``, ``_``, ``.``)."""
    flags: tuple[str, ...] = ()
    """`cli.train` options, e.g. ``("--disp.variant", "hinge")``."""
    preset: str | None = None
    """The `cli.train` preset this arm starts from instead of the protocol's (another model
    family with its own recipe, e.g. ``unet-tiny``); None: the protocol's."""

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise AnalysisError(
                f"arm name {self.name!r} is not allowed: expected letters, digits, '-', '_', '.'"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise AnalysisError(
                f"arm {self.name!r}: preset={self.preset!r} is not allowed: expected one of "
                + ", ".join(PRESETS)
            )


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything fixed before any result is seen, identical for every arm (written into the
    results file)."""

    preset: str = "sit-tiny"
    """The `cli.train` preset every arm starts from (sit-tiny: SiT-T/2 on the bundled digits),
    in float32 unless an arm's flags choose another dtype."""
    steps: int = 1500
    """Training steps of every arm; a cosine learning-rate schedule is set to end at the last
    step (``optim.decay_steps = steps``), so a shorter budget still anneals."""
    seeds: int = 5
    """Paired seeds: seed s fixes the initial weights, the data order and every noise draw."""
    samples: int = 1000
    """Images sampled per arm and seed (the same labels, noise and sampler for every arm)."""
    sampler_steps: int | None = None
    """Sampler grid points (None: the preset's sampler)."""
    reference: str = "digits-test"
    """FID-classifier reference: the 297 digits the feature classifier never saw."""
    examples: int = 256
    """Data examples of the representation analysis (norms, effective rank, uniformity)."""

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise AnalysisError(
                f"preset={self.preset!r} is not allowed: expected one of {', '.join(PRESETS)}"
            )
        for name in ("steps", "seeds", "samples", "examples"):
            if getattr(self, name) < 1:
                raise AnalysisError(f"{name}={getattr(self, name)} is not allowed: expected >= 1")

    def preset_of(self, arm: Arm) -> str:
        """The `cli.train` preset `arm` starts from: its own, else the protocol's."""
        return self.preset if arm.preset is None else arm.preset


@dataclasses.dataclass(frozen=True)
class Study:
    """A grid of arms x seeds; the first arm is the baseline every other arm is paired with."""

    name: str
    description: str
    arms: tuple[Arm, ...]
    protocol: Protocol = Protocol()

    def __post_init__(self):
        names = [a.name for a in self.arms]
        if len(names) < 2:
            raise AnalysisError(f"study {self.name!r} needs a baseline and at least one other arm")
        if len(set(names)) != len(names):
            raise AnalysisError(f"study {self.name!r} has repeated arm names: {names}")

    @property
    def baseline(self) -> Arm:
        return self.arms[0]

    def arm(self, name: str) -> Arm:
        """The arm called `name`."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise AnalysisError(
            f"arm {name!r} is not in study {self.name!r}: expected one of "
            + ", ".join(a.name for a in self.arms)
        )

    def run_dir(self, out: pathlib.Path, arm: Arm, seed: int) -> pathlib.Path:
        return pathlib.Path(out) / arm.name / f"seed-{seed}"

    def result_dir(self, out: pathlib.Path, result: dict) -> pathlib.Path:
        """The directory of the run that `result` (one run's record) came from."""
        return self.run_dir(out, self.arm(result["arm"]), result["seed"])

    def config(self, arm: Arm, seed: int, out: pathlib.Path) -> ExperimentConfig:
        """The `cli.train` config of one run of the study."""
        return arm_config(self.protocol, arm, seed, self.run_dir(out, arm, seed))


def arm_config(protocol: Protocol, arm: Arm, seed: int, out: pathlib.Path) -> ExperimentConfig:
    """Parse the arm's flags as `cli.train` would, under the protocol's fixed settings."""
    import tyro

    preset = protocol.preset_of(arm)
    flags = [
        preset,
        # float32 unless an arm says otherwise, so that results do not depend on the CPU's
        # matrix units (sit-tiny's dtype auto would pick bfloat16 on some CPUs only).
        "--model.dtype", "float32",
        *arm.flags,
        "--train.seed", str(seed),
        "--train.steps", str(protocol.steps),
        "--train.out", str(out),
        "--train.sample-count", "0",
    ]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            cfg = tyro.extras.overridable_config_cli(PRESETS, args=flags, prog="cli.study")
    except SystemExit:
        reason = next((l.strip("│ ").strip() for l in stderr.getvalue().splitlines() if "rror" in l or "nrecognized" in l), "")
        raise AnalysisError(
            f"arm {arm.name!r}: {' '.join(arm.flags)!r} are not valid cli.train options"
            + (f" ({reason})" if reason else "")
        ) from None
    if cfg.optim.schedule == "cosine" and cfg.optim.decay_steps != protocol.steps:
        if protocol.steps <= cfg.optim.warmup_steps:
            raise AnalysisError(
                f"steps={protocol.steps} is not allowed with {preset}'s "
                f"{cfg.optim.warmup_steps} warm-up steps: expected more"
            )
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, decay_steps=protocol.steps))
    return cfg


# ----------------------------------------------------------------------------------------------
# Built-in studies: the paper's Tables 2-4 and Fig. 4, at a size a laptop CPU runs


_VARIANTS = (
    ("infonce-l2", "infonce_l2"),
    ("infonce-cos", "infonce_cosine"),
    ("hinge", "hinge"),
    ("covariance", "covariance"),
)
_BASELINE = Arm("baseline", ("--disp.variant", "none"))


def _table2() -> Study:
    arms = [_BASELINE]
    for mode in ("off", "independent", "restricted"):
        for name, variant in _VARIANTS:
            prefix = "" if mode == "off" else f"contrastive-{mode}-"
            flags = ("--disp.variant", variant) + (() if mode == "off" else ("--disp.contrastive", mode))
            arms.append(Arm(prefix + name, flags))
    return Study(
        "table2",
        "Table 2: the four Dispersive Loss variants and their contrastive counterparts "
        "(two noised views, independent or restricted noise) against the baseline.",
        tuple(arms),
    )


def _table3(depth: int = 6) -> Study:
    arms = [_BASELINE]
    arms += [Arm(f"block-{b}", ("--disp.blocks", str(b))) for b in range(1, depth + 1)]
    arms.append(Arm("all-blocks", ("--disp.blocks", "all")))
    return Study(
        "table3",
        "Table 3: Dispersive Loss (InfoNCE-L2) on each single block of SiT-T/2 (6 blocks) and on all.",
        tuple(arms),
        Protocol(seeds=3),
    )


def _table4() -> Study:
    arms = [_BASELINE]
    for tau in ("2.0", "1.0", "0.5", "0.25"):
        for weight in ("0.25", "0.5", "1.0"):
            arms.append(Arm(f"tau-{tau}-lambda-{weight}", ("--disp.tau", tau, "--disp.weight", weight)))
    return Study(
        "table4",
        "Table 4: loss weight lambda x temperature tau of InfoNCE-L2.",
        tuple(arms),
        Protocol(seeds=3),
    )


def _recipes() -> Study:
    return Study(
        "recipes",
        "The paper's JAX recipe (lambda 0.5, tau 0.5, block depth/4, groups of 16) against the "
        "public PyTorch recipe (lambda 0.25, tau 1, last block, groups of 32).",
        (
            _BASELINE,
            Arm("paper", ()),
            Arm(
                "pytorch",
                ("--disp.weight", "0.25", "--disp.tau", "1.0", "--disp.blocks", "last", "--disp.group-size", "32"),
            ),
        ),
    )


def _models() -> Study:
    arms = []
    for family in ("SiT", "DiT"):
        for size in ("T", "S"):
            model = f"{family}-{size}/2"
            tag = model.lower().replace("/", "")
            arms.append(Arm(f"{tag}-baseline", ("--model.name", model, "--disp.variant", "none")))
            arms.append(Arm(f"{tag}-disp", ("--model.name", model)))
    return Study(
        "models",
        "Fig. 4's shape: SiT and DiT at two sizes, each with and without Dispersive Loss (each "
        "'-disp' arm is read against its own '-baseline'; the table pairs all with the first).",
        tuple(arms),
        Protocol(seeds=3),
    )


def _families() -> Study:
    arms = []
    for tag, preset in (("sit", "sit-tiny"), ("unet", "unet-tiny"), ("meanflow", "meanflow-tiny")):
        arms.append(Arm(f"{tag}-baseline", ("--disp.variant", "none"), preset))
        arms.append(Arm(f"{tag}-disp", (), preset))
    return Study(
        "families",
        "Dispersive Loss on the paper's three model families at CPU size, each with its own "
        "recipe and sampler: SiT-T/2 (50-point Heun), UNet-T (flow_matching's recipe, EDM-grid "
        "Heun) and MF-T/2 (MeanFlow, one step). Each '-disp' arm is read against its own "
        "'-baseline'; the table pairs all with the first.",
        tuple(arms),
        Protocol(seeds=3),
    )


def _precision() -> Study:
    arms = []
    for dtype, tag in (("float32", "f32"), ("bfloat16", "bf16")):
        arms.append(Arm(f"{tag}-baseline", ("--model.dtype", dtype, "--disp.variant", "none")))
        arms.append(Arm(f"{tag}-disp", ("--model.dtype", dtype)))
    return Study(
        "precision",
        "bfloat16 against float32 (on CPU: bf16 dot operands, f32 accumulation), with and without "
        "Dispersive Loss: does the cheaper arithmetic change the FID or what the loss does?",
        tuple(arms),
        Protocol(seeds=3),
    )


STUDIES: dict[str, Study] = {
    s.name: s
    for s in (_table2(), _table3(), _table4(), _recipes(), _models(), _families(), _precision())
}
"""The built-in studies, by name."""
