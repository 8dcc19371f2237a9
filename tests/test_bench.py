"""Benchmarks print figures; here we only check the FLOP count and that the commands run."""

import pytest


@pytest.mark.parametrize("name, gflop", [("SiT-S/2", 36.33), ("SiT-B/2", 138.03)])
def test_analytic_flops_match_the_reference_counts(name, gflop):
    # The PyTorch reference's training FLOPs per image (3x forward), cpu_perf_probe.md.
    from eqdisp.bench import analytic_flops_per_image

    assert analytic_flops_per_image(name) / 1e9 == pytest.approx(gflop, abs=0.005)


def test_bench_step_and_disp_report_figures(tmp_path):
    from cli.bench import main

    figures = main(["step", "SiT-T/4", "--batch", "16", "--steps", "1", "--json", str(tmp_path / "s.json")])
    assert figures["images_per_s"] > 0 and 0 < figures["mfu"] < 2
    assert (tmp_path / "s.json").exists()
    ratio = main(["disp", "SiT-T/4", "--batch", "16", "--rounds", "1"])
    assert ratio["ratio_on_off_median"] > 0


def test_bench_rejects_a_group_size_that_does_not_divide_the_batch():
    from eqdisp.bench import bench_step
    from eqdisp.config import ConfigError

    with pytest.raises(ConfigError, match="disp.group_size=16"):
        bench_step("SiT-T/4", 8)
