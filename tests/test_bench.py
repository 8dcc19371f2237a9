"""Benchmarks print figures; here we only check the FLOP count and that the commands run."""

import pytest


@pytest.mark.parametrize("name, gflop", [("SiT-S/2", 36.33), ("SiT-B/2", 138.03)])
def test_analytic_flops_match_the_reference_counts(name, gflop):
    # The PyTorch reference's training FLOPs per image (3x forward), cpu_perf_probe.md.
    from eqdisp.bench import analytic_flops_per_image

    assert analytic_flops_per_image(name) / 1e9 == pytest.approx(gflop, abs=0.005)


def test_bench_step_and_disp_report_figures(tmp_path):
    from cli.bench import main

    figures = main(
        ["step", "SiT-T/4", "--batch", "16", "--steps", "1", "--json", str(tmp_path / "s.json")]
    )
    assert figures["images_per_s"] > 0 and 0 < figures["mfu"] < 2
    assert (tmp_path / "s.json").exists()
    ratio = main(["disp", "SiT-T/4", "--batch", "16", "--rounds", "1"])
    assert ratio["ratio_on_off_median"] > 0 and ratio["rounds"] == 1
    assert (
        0 < ratio["temporaries_mib_off"]
        and 0 < ratio["xla_gbytes_accessed_off"] < ratio["xla_gbytes_accessed_on"]
    )


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

    monkeypatch.delitem(sys.modules, "cli._torch_sit", raising=False)
    monkeypatch.delattr("cli._torch_sit", raising=False)
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
    from cli._torch_sit import TorchSiT

    reference = TorchSiT(name)
    model = eqdisp.make_model(name, key=getkey())
    ours = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    assert sum(p.numel() for p in reference.parameters()) == ours
    out, tap = reference(
        torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long)
    )
    assert tuple(out.shape) == (2, 4, 32, 32)
    assert tuple(tap.shape) == (2, model.num_tokens, model.dim)
