"""The PyTorch reference that `python -m cli.bench reference` times: SiT's train step in PyTorch.

The model has the structure of the official SiT `models.py` (DiT's backbone): timm-style
PatchEmbed, Attention with fused `scaled_dot_product_attention`, Mlp with tanh GELU, adaLN-Zero
blocks, a fixed position embedding, `learn_sigma` output with the sigma half dropped. The step is
SiT's `train.py` with the linear path (velocity target `x1 - x0`), AdamW (lr 1e-4, betas 0.9/0.95,
no weight decay), label dropout 0.1, and the EMA update as one fused lerp. The dispersive term
is InfoNCE-L2 at the paper's settings (block `depth // 4`, 1-based, groups of 16, tau 0.5, lambda
0.5), with squared distances divided by D as in the public code.

It exists to compare speeds on one machine, not to train: weights are random N(0, 0.02) (adaLN
included, so every path computes) and the data are Gaussian. Needs `torch`, which eqdisp does not
depend on; this module is imported only when the reference is asked for.
"""

import contextlib
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from eqdisp.bench import analytic_flops_per_image
from eqdisp.config import ConfigError
from eqdisp.models import parse_model_name


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class TorchSiT(nn.Module):
    """SiT on 4x32x32 latents with 1000 classes; `forward` also returns block `tap`'s output."""

    def __init__(self, name: str, *, input_size: int = 32, in_channels: int = 4):
        super().__init__()
        spec = parse_model_name(name)
        dim, p = spec.dim, spec.patch_size
        self.patch_size, self.in_channels, self.tap = p, in_channels, max(spec.depth // 4, 1) - 1
        self.x_embedder = nn.Conv2d(in_channels, dim, p, p)
        tokens = (input_size // p) ** 2
        self.register_buffer("pos_embed", torch.randn(1, tokens, dim) * 0.02)  # fixed, as in SiT
        self.t_embedder = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(1000 + 1, dim)  # + the null label
        self.blocks = nn.ModuleList(_Block(dim, spec.num_heads) for _ in range(spec.depth))
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear_final = nn.Linear(dim, p * p * 2 * in_channels)  # learn_sigma
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)

    def _time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.t_embedder(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self._time_embedding(t) + self.y_embedder(y)
        tap = h
        for index, block in enumerate(self.blocks):
            h = block(h, c)
            if index == self.tap:
                tap = h
        shift, scale = self.adaLN_final(c).chunk(2, dim=1)
        h = self.linear_final(_modulate(self.norm_final(h), shift, scale))
        n, tokens, _ = h.shape
        grid, p, channels = math.isqrt(tokens), self.patch_size, 2 * self.in_channels
        h = h.reshape(n, grid, grid, p, p, channels)
        out = torch.einsum("nhwpqc->nchpwq", h).reshape(n, channels, grid * p, grid * p)
        return out[:, : self.in_channels], tap


def _dispersive(z: torch.Tensor, group: int = 16, tau: float = 0.5) -> torch.Tensor:
    z = z.reshape(z.shape[0] // group, group, -1)
    dist = torch.cdist(z, z) ** 2 / z.shape[-1]
    return (torch.logsumexp(-dist.flatten(1) / tau, dim=-1) - math.log(group * group)).mean()


def _describe(name: str, batch: int, dtype: str) -> dict:
    return {
        "impl": "pytorch",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": name,
        "batch": batch,
        "dtype": dtype if dtype == "float32" else f"{dtype} (torch.autocast)",
    }


def _autocast(dtype: str):
    """`torch.autocast` on the CPU for bfloat16 (matmuls in bf16, what autocast keeps in float32
    stays so), a no-op context for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, dtype))


def _timed(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_reference_step(
    name: str,
    batch: int,
    *,
    disp: bool = True,
    dtype: str = "float32",
    steps: int = 5,
    warmup: int = 2,
) -> dict:
    """Median train-step time of the PyTorch reference (AdamW + EMA, dispersive term if `disp`);
    `dtype="bfloat16"` runs the forward under `torch.autocast` (the backward follows it)."""
    if disp and batch % 16:
        raise ConfigError(
            f"--batch {batch} is not allowed with the dispersive term: expected a multiple of 16"
        )
    torch.manual_seed(0)
    model = TorchSiT(name)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def step():
        x1 = torch.randn(batch, 4, 32, 32)
        y = torch.randint(0, 1000, (batch,))
        y = torch.where(torch.rand(batch) < 0.1, 1000, y)  # label dropout to the null class
        x0 = torch.randn_like(x1)
        t = torch.rand(batch)
        t4 = t[:, None, None, None]
        with _autocast(dtype):
            out, tap = model(t4 * x1 + (1 - t4) * x0, t, y)
        loss = ((out.float() - (x1 - x0)) ** 2).mean()
        if disp:
            loss = loss + 0.5 * _dispersive(tap.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - 0.9999)

    times = _timed(step, steps, warmup)
    median = statistics.median(times)
    return {
        **_describe(name, batch, dtype),
        "variant": "infonce_l2" if disp else "none",
        "step_s_median": round(median, 4),
        "step_s_min": round(min(times), 4),
        "images_per_s": round(batch / median, 3),
        "achieved_gflop_s": round(analytic_flops_per_image(name) * batch / median / 1e9, 1),
    }


def bench_reference_forward(
    name: str, batch: int, *, dtype: str = "float32", evals: int = 6
) -> dict:
    """Median time of one network evaluation without gradients (one NFE of a sampler), under
    `torch.autocast` for `dtype="bfloat16"`."""
    torch.manual_seed(0)
    model = TorchSiT(name).eval()
    x = torch.randn(batch, 4, 32, 32)
    y = torch.randint(0, 1000, (batch,))
    t = torch.full((batch,), 0.5)
    with torch.no_grad(), _autocast(dtype):
        times = _timed(lambda: model(x, t, y), evals, warmup=1)
    return {
        **_describe(name, batch, dtype),
        "ms_per_nfe": round(1000 * statistics.median(times), 1),
    }
