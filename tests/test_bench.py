"""Benchmarks print figures; here we only check the FLOP count and that the commands run."""

import os

import pytest


@pytest.mark.parametrize("name, gflop", [("SiT-S/2", 36.33), ("SiT-B/2", 138.03)])
def test_analytic_flops_match_the_reference_counts(name, gflop):
    # The PyTorch reference's training FLOPs per image (3x forward), cpu_perf_probe.md.
    from eqdisp.bench import analytic_flops_per_image

    assert analytic_flops_per_image(name) / 1e9 == pytest.approx(gflop, abs=0.005)


def test_bench_step_and_disp_report_figures(tmp_path, capsys):
    import json

    from cli.bench import main

    figures = main(
        ["step", "SiT-T/4", "--batch", "16", "--steps", "1", "--json", str(tmp_path / "s.json")]
    )
    assert figures["images_per_s"] > 0 and 0 < figures["mfu"] < 2
    # The kernel's time cannot exceed the step's on the cores the process has.
    assert 0 <= figures["system_s_per_step"] <= figures["step_s_max"] * os.cpu_count()
    assert figures["page_faults_per_step"] >= 0
    assert json.loads((tmp_path / "s.json").read_text()) == figures
    # By default a readable summary, not JSON: the CPU first, then `key: value unit` lines.
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].strip().startswith(f"cpu: {figures['cpu']['model']}")
    assert not lines[0].lstrip().startswith("{")
    assert any(line.strip() == "model: SiT-T/4" for line in lines)
    assert any(line.strip() == f"images_per_s: {figures['images_per_s']} img/s" for line in lines)
    assert any(line.strip().startswith("memory_gib.temporaries: ") for line in lines)

    ratio = main(["disp", "SiT-T/4", "--batch", "16", "--rounds", "1", "--json", "-"])
    assert ratio["ratio_on_off_median"] > 0 and ratio["rounds"] == 1
    assert (
        0 < ratio["temporaries_mib_off"]
        and 0 < ratio["xla_gbytes_accessed_off"] < ratio["xla_gbytes_accessed_on"]
    )
    assert json.loads(capsys.readouterr().out) == ratio  # `--json -`: the JSON, no summary
    assert not (tmp_path / "-").exists()


def test_bench_sample_reports_figures_and_the_cpu(capsys):
    from cli.bench import main
    from eqdisp.bench import cpu_info

    figures = main(["sample", "SiT-T/4", "--batch", "2", "--steps", "3"])
    assert figures["nfe"] == 4 and figures["ms_per_nfe"] > 0 and figures["cpu"] == cpu_info()
    out = capsys.readouterr().out
    assert out.lstrip().startswith("cpu: ") and "ms_per_nfe: " in out and " img/s" in out


_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""


@pytest.mark.parametrize(
    "text, model, isa",
    [
        (_CPUINFO, "Intel(R) Xeon(R) Platinum 8480+", ["AMX", "AVX-512-BF16", "AVX-512", "AVX2"]),
        ("model name\t: AMD EPYC 7B13\nflags\t: fpu sse avx2\n", "AMD EPYC 7B13", ["AVX2"]),
    ],
)
def test_cpu_info_reads_the_model_and_the_matmul_extensions(text, model, isa):
    import os

    from eqdisp.bench import cpu_info

    assert cpu_info(text) == {"model": model, "isa": isa, "cores": os.cpu_count()}


def test_cpu_info_without_proc_cpuinfo_falls_back_to_platform(monkeypatch):
    import platform

    from eqdisp.bench import cpu_info

    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert cpu_info("")["model"] == "arm" and cpu_info("")["isa"] == []
    assert cpu_info()["model"]  # this machine's, whatever it is


def test_reference_records_the_cpu_and_prints_a_summary(monkeypatch, capsys):
    # Without torch: a stand-in for eqdisp.torch_reference checks what cli.bench adds to its figures.
    import sys
    import types

    from cli.bench import main
    from eqdisp.bench import cpu_info

    fake = types.ModuleType("eqdisp.torch_reference")
    fake.bench_reference_step = lambda name, batch, *, disp, dtype, steps: {
        "impl": "pytorch", "model": name, "batch": batch, "dtype": dtype, "step_s_median": 0.5,
        "images_per_s": 64.0,
    }
    monkeypatch.delattr("eqdisp.torch_reference", raising=False)
    monkeypatch.setitem(sys.modules, "eqdisp.torch_reference", fake)
    figures = main(["reference", "SiT-S/2", "--dtype", "bfloat16"])
    assert figures["cpu"] == cpu_info() and figures["images_per_s"] == 64.0
    assert figures["dtype"] == "bfloat16"
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0].startswith("cpu: ") and "step_s_median: 0.5 s" in lines
    assert "images_per_s: 64.0 img/s" in lines


def test_bench_rejects_a_group_size_that_does_not_divide_the_batch():
    from eqdisp.bench import bench_step
    from eqdisp.config import ConfigError

    with pytest.raises(ConfigError, match="disp.group_size=16"):
        bench_step("SiT-T/4", 8)


def test_reference_without_torch_is_a_one_line_error(monkeypatch):
    import builtins
    import sys

    from cli.bench import main
    from eqdisp.config import ConfigError

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "eqdisp.torch_reference", raising=False)
    monkeypatch.delattr("eqdisp.torch_reference", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(
        ConfigError, match=r"^the PyTorch reference needs torch, .*pip install torch$"
    ):
        main(["reference", "SiT-S/2"])


@pytest.mark.parametrize("name", ["SiT-S/2", "SiT-B/4"])
def test_reference_is_the_same_network(getkey, name):
    # Where torch is installed: the PyTorch reference trains exactly eqdisp's parameters (the
    # position embedding is a fixed buffer in both) and returns the same shapes.
    torch = pytest.importorskip("torch")
    import equinox as eqx
    import jax

    import eqdisp
    from eqdisp.torch_reference import TorchSiT

    reference = TorchSiT(name)
    model = eqdisp.make_model(name, key=getkey())
    ours = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    assert sum(p.numel() for p in reference.parameters()) == ours
    out, tap = reference(
        torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long)
    )
    assert tuple(out.shape) == (2, 4, 32, 32)
    assert tuple(tap.shape) == (2, model.num_tokens, model.dim)
