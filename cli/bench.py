"""Benchmarks that print figures: ``python -m cli.bench step SiT-S/2 --batch 32``, ``disp``,
``sample``, ``vae`` (SD-VAE encode/decode images/s) and ``reference`` (the PyTorch SiT step on the
same machine, when torch is installed).

Prints a summary (``key: value unit``, the CPU first); ``--json PATH`` also writes every figure to
a file, ``--json -`` prints the JSON instead of the summary.
"""

import dataclasses
import json
from typing import Literal

import tyro

from eqdisp.config import AttentionImpl, Bf16Mode, BlockImpl, ConfigError, DispConfig, Remat
from eqdisp.io import write_text_atomically
from eqdisp.vae import VAEConfig


@dataclasses.dataclass(frozen=True)
class Step:
    """Train step: compile time, median step time, images/s, GFLOP/s, MFU and memory."""

    model: tyro.conf.Positional[str]
    """Model name, e.g. SiT-S/2 (32x32x4 latents, 1000 classes)."""
    batch: int = 32
    disp: DispConfig = DispConfig()
    dtype: Literal["float32", "bfloat16"] = "float32"
    bf16_mode: Bf16Mode = "auto"
    """How bfloat16 is applied (``ModelConfig.bf16_mode``); ``auto``: dots on CPU, cast elsewhere."""
    block_impl: BlockImpl = "auto"
    """``auto``: scan on CPU, unrolled on accelerators."""
    attention: AttentionImpl = "auto"
    """Attention kernel; ``auto``: cuDNN flash attention on NVIDIA GPUs in bfloat16, else einsum."""
    remat: Remat = "auto"
    """What the backward recomputes per block; ``auto``: ``dots`` on CPU, ``none`` elsewhere."""
    steps: int = 5
    """Timed steps (after 2 warm-up steps)."""
    json: str | None = None
    """Also write all figures as JSON to this file; ``-`` prints the JSON instead of the summary."""

    def run(self) -> dict:
        from eqdisp.bench import bench_step

        return bench_step(
            self.model, self.batch, disp=self.disp, dtype=self.dtype, block_impl=self.block_impl,
            attention=self.attention, remat=self.remat, bf16_mode=self.bf16_mode, steps=self.steps,
        )


@dataclasses.dataclass(frozen=True)
class Disp:
    """The same train step with the dispersive term on and off, interleaved: time ratio on/off."""

    model: tyro.conf.Positional[str]
    batch: int = 32
    disp: DispConfig = DispConfig()
    rounds: int = 5
    json: str | None = None
    """Also write all figures as JSON to this file; ``-`` prints the JSON instead of the summary."""

    def run(self) -> dict:
        from eqdisp.bench import bench_disp

        return bench_disp(self.model, self.batch, disp=self.disp, rounds=self.rounds)


@dataclasses.dataclass(frozen=True)
class Sample:
    """ODE sampling: milliseconds per network evaluation and images/s."""

    model: tyro.conf.Positional[str]
    batch: int = 16
    steps: int = 250
    """Grid points, SiT's counting (Heun: 2(steps-1) evaluations)."""
    method: Literal["heun", "euler"] = "heun"
    evals: int = 0
    """If > 0, time only this many grid points and extrapolate to ``steps``."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    bf16_mode: Bf16Mode = "auto"
    """How bfloat16 is applied (``ModelConfig.bf16_mode``); ``auto``: dots on CPU, cast elsewhere."""
    json: str | None = None
    """Also write all figures as JSON to this file; ``-`` prints the JSON instead of the summary."""

    def run(self) -> dict:
        from eqdisp.bench import bench_sample

        return bench_sample(
            self.model, self.batch, steps=self.steps, method=self.method, evals=self.evals,
            dtype=self.dtype, bf16_mode=self.bf16_mode,
        )


@dataclasses.dataclass(frozen=True)
class Reference:
    """The PyTorch reference (the official SiT model and step) on this machine, to compare with
    `step` and `sample`: one train step with AdamW, EMA and the dispersive term at the paper's
    settings, or with `--nfe` one network evaluation. Needs `torch` (not an eqdisp dependency)."""

    model: tyro.conf.Positional[str]
    batch: int = 32
    disp: bool = True
    """Add the dispersive term (InfoNCE-L2, block depth/4, groups of 16, tau 0.5, lambda 0.5)."""
    nfe: bool = False
    """Time one forward pass without gradients instead of a train step."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """``bfloat16``: run the forward under ``torch.autocast`` (PyTorch's mixed precision)."""
    steps: int = 5
    """Timed steps or evaluations (after warm-up)."""
    threads: int | None = None
    """PyTorch intra-op threads; default: torch's own choice (the physical cores)."""
    json: str | None = None
    """Also write all figures as JSON to this file; ``-`` prints the JSON instead of the summary."""

    def run(self) -> dict:
        try:
            from eqdisp import torch_reference  # imports torch
        except ImportError as error:
            raise ConfigError(
                f"the PyTorch reference needs torch, which is not importable ({error}): "
                "pip install torch"
            ) from None
        from eqdisp.bench import cpu_info

        if self.threads is not None:
            torch_reference.torch.set_num_threads(self.threads)
        if self.nfe:
            figures = torch_reference.bench_reference_forward(
                self.model, self.batch, dtype=self.dtype, evals=self.steps
            )
        else:
            figures = torch_reference.bench_reference_step(
                self.model, self.batch, disp=self.disp, dtype=self.dtype, steps=self.steps
            )
        return {**figures, "cpu": cpu_info()}


@dataclasses.dataclass(frozen=True)
class Vae:
    """The SD-VAE (random weights): encode and decode images/s, compile times and memory."""

    batch: int = 4
    resolution: int = 256
    """Image side (a multiple of 8); latents are resolution / 8."""
    steps: int = 3
    """Timed calls of encode and of decode (after one warm-up call each)."""
    config: VAEConfig = VAEConfig()
    """The architecture; default the SD-VAE's (sd-vae-ft-ema / -ft-mse)."""
    json: str | None = None
    """Also write all figures as JSON to this file; ``-`` prints the JSON instead of the summary."""

    def run(self) -> dict:
        from eqdisp.bench import bench_vae

        return bench_vae(self.batch, self.resolution, config=self.config, steps=self.steps)


def main(argv: list[str] | None = None) -> dict:
    command = tyro.extras.subcommand_cli_from_dict(
        {"step": Step, "disp": Disp, "sample": Sample, "reference": Reference, "vae": Vae},
        prog="python -m cli.bench",
        args=argv,
    )
    figures = command.run()
    from eqdisp.bench import format_figures

    text = json.dumps(figures, indent=2)
    print(text if command.json == "-" else format_figures(figures))
    if command.json not in (None, "-"):
        write_text_atomically(command.json, text + "\n")
    return figures


if __name__ == "__main__":
    from cli._entry import run

    run(main)
