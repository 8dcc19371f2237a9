"""Released PyTorch SiT, DiT, REPA and Dispersive-Loss checkpoints to eqdisp models and runs.

The layout is the official `models.py` of DiT and SiT (class `DiT` / `SiT`; REPA's
`models/sit.py` is the same network plus its `projectors`), and the mapping is exact in both
directions:

- `x_embedder.proj.weight` is the patch conv `(D, C, p, p)`; eqdisp flattens each patch in the
  same `(c, kh, kw)` order (`eqdisp.models.patchify`), so the kernel is a reshape of eqdisp's
  `(D, C*p*p)`.
- `blocks.<i>.attn.qkv` is the fused `(3D, D)` projection, and every `adaLN_modulation.1` keeps
  its chunk order, `(shift, scale, gate) x (msa, mlp)` in the blocks and `(shift, scale)` in the
  final layer: eqdisp splits the same contiguous chunks, so these are copies. The blocks are
  stacked along a leading `depth` axis in eqdisp.
- `final_layer.linear` rows are token outputs ordered `(kh, kw, c)`, which
  `eqdisp.models.unpatchify` reads in that order; the learned-sigma rows are kept (DiT's variance
  needs them; SiT drops those channels in its forward, as eqdisp's SiT does).
- `y_embedder.embedding_table.weight` has `num_classes + 1` rows (the last is the null label).
- `pos_embed` is the fixed sin-cos buffer; eqdisp computes its own and only checks the file's.

What the file determines is inferred (input size from `pos_embed`, channels from the patch kernel,
learned sigma from the final rows, classes from the label table) and checked against the model name;
every tensor is accounted for, and a missing, unknown or misshapen one is a one-line `ConvertError`.

Files are read with `eqdisp.io` (no torch): a bare state dict (the SiT-XL/2 and DiT-XL/2
releases), a training checkpoint `{"model", "ema", "opt", "args"[, "steps"]}` (SiT, DiT,
Dispersive Loss, REPA), or a `.safetensors`/`.npz` state dict. REPA checkpoints are recognised by
their `projectors.*` weights (skipped and reported) or their training arguments; their network is
marked `time_convention="repa"` (t = 1 noise, velocity noise - data), which eqdisp's forward
converts.
"""

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Float

from .config import (
    DISP_PRESETS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SamplerConfig,
    TransportConfig,
)
from .io import WeightsError, write_text_atomically
from .models import (
    DiffusionTransformer,
    make_model,
    parse_model_name,
    sincos_pos_embed_2d,
)

POS_EMBED_ATOL = 1e-3
"""Largest difference from eqdisp's sin-cos table accepted in a file's `pos_embed`. The buffer is
frozen but the references' EMA update still touches it: 400k float32 steps of `e = 0.9999 e +
1e-4 p` with `e = p` drift it by up to 1.6e-4 (simulated); a table of another grid or width
differs by O(1)."""

_SKIPPED_PREFIXES = ("projectors.",)  # REPA's alignment heads: not part of the generator
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
_QK_NORM = re.compile(r"^blocks\.\d+\.attn\.[qk]_norm\.")
_LEGACY_REPA = re.compile(r"^decoder_blocks\.(\d+)\.(.*)$")


class ConvertError(WeightsError):
    """A checkpoint does not convert: wrong model name, a missing, unknown or misshapen tensor, an
    entry that is not there, an option eqdisp does not implement. The message is one line."""


# ----------------------------------------------------------------------------------------------
# The key mapping, in the order of the official state dict


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One array leaf of the model and the state-dict keys it fills (one per block if stacked)."""

    where: Callable[[DiffusionTransformer], Any]
    keys: tuple[str, ...]
    torch_shape: tuple[int, ...]  # the shape of each key's tensor

    @property
    def stacked(self) -> bool:
        return self.keys[0].startswith("blocks.")


_LINEARS_BEFORE = (
    ("x_embedder.proj", lambda m: m.x_embedder.proj),
    ("t_embedder.mlp.0", lambda m: m.t_embedder.mlp_in),
    ("t_embedder.mlp.2", lambda m: m.t_embedder.mlp_out),
)
_BLOCK_LINEARS = (
    ("attn.qkv", lambda b: b.qkv),
    ("attn.proj", lambda b: b.proj),
    ("mlp.fc1", lambda b: b.fc1),
    ("mlp.fc2", lambda b: b.fc2),
    ("adaLN_modulation.1", lambda b: b.adaln_modulation),
)
_LINEARS_AFTER = (
    ("final_layer.linear", lambda m: m.final_layer.linear),
    ("final_layer.adaLN_modulation.1", lambda m: m.final_layer.adaln_modulation),
)


def _leaves(model: DiffusionTransformer) -> list[_Leaf]:
    """Every array leaf of `model` (concrete or abstract) with its state-dict keys and shapes."""

    def linear(name: str, get: Callable) -> list[_Leaf]:
        out = []
        for part in ("weight", "bias"):
            where = lambda m, get=get, part=part: getattr(get(m), part)
            shape = tuple(where(model).shape)
            if name == "x_embedder.proj" and part == "weight":  # the conv kernel (D, C, p, p)
                p = model.patch_size
                shape = (shape[0], model.in_channels, p, p)
            out.append(_Leaf(where, (f"{name}.{part}",), shape))
        return out

    def block_linear(name: str, get: Callable) -> list[_Leaf]:
        out = []
        for part in ("weight", "bias"):
            where = lambda m, get=get, part=part: getattr(get(m.blocks), part)
            keys = tuple(f"blocks.{i}.{name}.{part}" for i in range(model.depth))
            out.append(_Leaf(where, keys, tuple(where(model).shape[1:])))
        return out

    leaves = [leaf for name, get in _LINEARS_BEFORE for leaf in linear(name, get)]
    table = lambda m: m.y_embedder.embedding_table
    leaves.append(_Leaf(table, ("y_embedder.embedding_table.weight",), tuple(table(model).shape)))
    leaves += [leaf for name, get in _BLOCK_LINEARS for leaf in block_linear(name, get)]
    leaves += [leaf for name, get in _LINEARS_AFTER for leaf in linear(name, get)]
    return leaves


def torch_state_dict_shapes(model: DiffusionTransformer) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the official state dict of `model`, in the official order.

    **Arguments:**

    - `model`: a `DiffusionTransformer`, concrete or abstract (`eqx.filter_eval_shape(make_model,
        "SiT-XL/2", key=...)` allocates nothing).

    **Returns:** `{key: shape}`, `pos_embed` first, the blocks' keys grouped by block.
    """
    shapes = {"pos_embed": (1, model.num_tokens, model.dim)}
    leaves = _leaves(model)
    for leaf in leaves:
        if not leaf.stacked:
            if leaf.keys[0].startswith("final_layer."):
                continue
            shapes[leaf.keys[0]] = leaf.torch_shape
    for i in range(model.depth):
        for leaf in leaves:
            if leaf.stacked:
                shapes[leaf.keys[i]] = leaf.torch_shape
    for leaf in leaves:
        if leaf.keys[0].startswith("final_layer."):
            shapes[leaf.keys[0]] = leaf.torch_shape
    return shapes


def model_to_torch_state_dict(model: DiffusionTransformer) -> dict[str, Float[np.ndarray, "..."]]:
    """The official-layout state dict of `model`: float32 NumPy arrays, official key order.

    Inverse of `torch_state_dict_to_model`, bit for bit. `pos_embed` is eqdisp's fixed table
    `(1, tokens, dim)`; a REPA network is written as stored (REPA's weights, without projectors).

    **Arguments:**

    - `model`: the transformer.

    **Returns:** `{key: array}` with the keys of `torch_state_dict_shapes(model)`.
    """
    arrays = {}
    for leaf in _leaves(model):
        value = np.array(leaf.where(model), dtype=np.float32)  # a writable copy
        if leaf.stacked:
            for i, key in enumerate(leaf.keys):
                arrays[key] = value[i]
        else:
            arrays[leaf.keys[0]] = value.reshape(leaf.torch_shape)
    pos = sincos_pos_embed_2d(model.dim, model.grid_size)[None].copy()
    keys = torch_state_dict_shapes(model)
    return {key: pos if key == "pos_embed" else arrays[key] for key in keys}


# ----------------------------------------------------------------------------------------------
# State dict -> model


@dataclasses.dataclass(frozen=True)
class _Converted:
    model: DiffusionTransformer
    skipped: tuple[str, ...]
    renamed: str | None
    pos_embed_max_abs_diff: float


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in np.shape(value))


def _normalise_keys(state: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Strip a wrapper prefix every key carries (DDP `module.`, torch.compile `_orig_mod.`) and
    rename REPA's legacy `decoder_blocks.<j>` to `blocks.<j + encoder depth>` (REPA's
    `load_legacy_checkpoints`; the encoder depth is the number of `blocks.<i>` in the file).

    **Returns:** the renamed dict and a note of what was renamed (None if nothing).
    """
    state = dict(state)
    notes = []
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
            notes.append(f"stripped the '{prefix}' prefix")
    legacy = [key for key in state if _LEGACY_REPA.match(key)]
    if legacy:
        encoder_depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        renamed = {}
        for key, value in state.items():
            match = _LEGACY_REPA.match(key)
            if match:
                key = f"blocks.{int(match.group(1)) + encoder_depth}.{match.group(2)}"
            renamed[key] = value
        state = renamed
        notes.append(f"renamed REPA's legacy decoder_blocks.* after {encoder_depth} encoder blocks")
    return state, "; ".join(notes) or None


def _infer_config(
    state: Mapping[str, Any],
    model_name: str,
    *,
    input_size: int | None,
    in_channels: int | None,
    num_classes: int | None,
    learn_sigma: bool | None,
    time_convention: Literal["sit", "repa"] | None,
) -> ModelConfig:
    """The `ModelConfig` the file determines, with every given value kept as the expectation.

    Inference never raises on odd shapes: it falls back to the reference defaults, and the shape
    check that follows names the tensor that does not fit.
    """
    spec = parse_model_name(model_name)
    p = spec.patch_size
    kernel = _shape(state.get("x_embedder.proj.weight", ()))
    if in_channels is None:
        in_channels = kernel[1] if len(kernel) == 4 and kernel[1] > 0 else 4
    if input_size is None:
        pos = _shape(state.get("pos_embed", ()))
        grid = math.isqrt(pos[1]) if len(pos) == 3 else 0
        input_size = grid * p if grid > 0 and grid * grid == pos[1] else 32
    if learn_sigma is None:
        rows = _shape(state.get("final_layer.linear.weight", ()))
        learn_sigma = not (len(rows) == 2 and rows[0] == p * p * in_channels)
    if num_classes is None:
        table = _shape(state.get("y_embedder.embedding_table.weight", ()))
        num_classes = table[0] - 1 if len(table) == 2 and table[0] >= 2 else 1000
    if time_convention is None:
        repa = any(key.startswith(_SKIPPED_PREFIXES) for key in state)
        time_convention = "repa" if repa else "sit"
    return ModelConfig(
        name=model_name,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        time_convention=time_convention,
    )


def _abstract_model(config: ModelConfig) -> DiffusionTransformer:
    """The transformer `config` describes, with `ShapeDtypeStruct` leaves (nothing allocated)."""
    try:
        return eqx.filter_eval_shape(make_model, config, key=jr.key(0))
    except ValueError as error:  # an architecture the transformer refuses (e.g. input_size % p)
        raise ConvertError(f"{config.name}: {error}") from None


def _describe(config: ModelConfig) -> str:
    sigma = "learn_sigma" if config.learn_sigma else "no learn_sigma"
    return (
        f"{config.name} (input_size {config.input_size}, in_channels {config.in_channels}, "
        f"num_classes {config.num_classes}, {sigma})"
    )


def _check_keys(
    state: Mapping[str, Any], expected: dict[str, tuple[int, ...]], config: ModelConfig
) -> tuple[str, ...]:
    """Every tensor accounted for, in this order: REPA's qk-norm (not implemented), the shapes of
    the expected keys, missing keys, unknown keys. Reads no values.

    **Returns:** the skipped keys (REPA's projectors).
    """
    for key in state:
        if _QK_NORM.match(key):
            raise ConvertError(
                f"{key} {_shape(state[key])}: REPA's qk_norm is not implemented in eqdisp "
                "(only checkpoints trained without --qk-norm convert)"
            )
    # The patch kernel first: it holds the width, the channels and the patch size of the file.
    kernel = "x_embedder.proj.weight"
    order = [kernel, *(key for key in expected if key != kernel)]
    for key in order:
        want = expected[key]
        if key in state and _shape(state[key]) != want:
            raise ConvertError(
                f"{key} has shape {_shape(state[key])}, expected {want} for {_describe(config)}"
            )
    missing = [key for key in expected if key not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(
            f"missing key {missing[0]}{more}: expected shape {expected[missing[0]]} for "
            f"{_describe(config)}"
        )
    skipped = tuple(key for key in state if key.startswith(_SKIPPED_PREFIXES))
    unknown = [key for key in state if key not in expected and key not in skipped]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConvertError(
            f"unknown key {unknown[0]} with shape {_shape(state[unknown[0]])}{more}: not in the "
            f"state dict of {_describe(config)}"
        )
    return skipped


def _read_tensor(state: Mapping[str, Any], key: str) -> np.ndarray:
    """One tensor as float32 (exact from float16/bfloat16), checked to be floating and finite."""
    array = np.asarray(state[key])
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise ConvertError(f"{key} has dtype {array.dtype}, expected a floating-point tensor")
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ConvertError(f"{key} {array.shape} holds non-finite values (a corrupt checkpoint?)")
    return array


def _convert(
    state: Mapping[str, Any],
    model_name: str,
    *,
    input_size: int | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
    learn_sigma: bool | None = None,
    time_convention: Literal["sit", "repa"] | None = None,
) -> _Converted:
    state, renamed = _normalise_keys(state)
    config = _infer_config(
        state,
        model_name,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        time_convention=time_convention,
    )
    template = _abstract_model(config)
    skipped = _check_keys(state, torch_state_dict_shapes(template), config)

    reference = sincos_pos_embed_2d(template.dim, template.grid_size)
    pos_diff = float(np.max(np.abs(_read_tensor(state, "pos_embed")[0] - reference)))
    if pos_diff > POS_EMBED_ATOL:
        raise ConvertError(
            f"pos_embed differs from the fixed 2-D sin-cos table of a {template.grid_size}x"
            f"{template.grid_size} grid of width {template.dim} by up to {pos_diff:.3g} "
            f"(accepted: {POS_EMBED_ATOL:g}, EMA drift of the frozen buffer)"
        )

    # One leaf at a time, so an XL file is held once (as model arrays) plus one stacked leaf.
    leaves = _leaves(template)
    values = []
    for leaf in leaves:
        if leaf.stacked:
            value = np.stack([_read_tensor(state, key) for key in leaf.keys])
        else:
            value = _read_tensor(state, leaf.keys[0]).reshape(leaf.where(template).shape)
        values.append(jnp.asarray(value))
    model = eqx.tree_at(lambda m: [leaf.where(m) for leaf in leaves], template, values)
    left = [x for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct)]
    assert not left, f"{len(left)} leaves of the model have no state-dict key"  # a mapping bug
    return _Converted(model, skipped, renamed, pos_diff)


def torch_state_dict_to_model(
    state: Mapping[str, Any],
    model_name: str,
    *,
    input_size: int | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
    learn_sigma: bool | None = None,
    time_convention: Literal["sit", "repa"] | None = None,
) -> DiffusionTransformer:
    """Build a transformer from an official-layout state dict (SiT, DiT, REPA, Dispersive Loss).

    **Arguments:**

    - `state`: key -> tensor (NumPy arrays or anything `np.asarray` reads, e.g. `eqdisp.io`'s lazy
        tensors). A `module.` (DDP) or `_orig_mod.` (torch.compile) prefix on every key is
        stripped; REPA's `projectors.*` are skipped; REPA's legacy `decoder_blocks.*` renamed.
    - `model_name`: `{SiT,DiT}-{T,S,B,L,XL}/{2,4,8}`: the family, depth, width and patch.
    - `input_size`, `in_channels`, `num_classes`, `learn_sigma`: None infers each from the file
        (`pos_embed` tokens x patch, the patch kernel, the label table's rows - 1, the final
        layer's rows); a value given is checked against the file.
    - `time_convention`: `"sit"` or `"repa"`; None means `"repa"` when the file has REPA's
        `projectors.*`, else `"sit"`.

    **Returns:** the model, float32, bit-identical to the file's tensors.

    **Raises:** `ConvertError` (one line naming the key and both shapes) for a missing, unknown or
    misshapen tensor, a `pos_embed` that is not the sin-cos table, REPA's qk-norm weights, a
    non-float or non-finite tensor; `ConfigError` for a bad model name.
    """
    return _convert(
        state,
        model_name,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        time_convention=time_convention,
    ).model


# ----------------------------------------------------------------------------------------------
# Files


Weights = Literal["ema", "model"]


@dataclasses.dataclass(frozen=True)
class TorchCheckpoint:
    """A converted PyTorch checkpoint and what the conversion found.

    **Fields:**

    - `model`: the transformer.
    - `source`: the file read.
    - `kind`: `"state dict"` (a bare state dict, as the released SiT/DiT weights) or
        `"training checkpoint"` (`{"model", "ema", "opt", "args", ...}`).
    - `entry`: the entry of a training checkpoint that was converted (`"ema"` or `"model"`),
        else None.
    - `skipped`: keys not converted (REPA's `projectors.*`).
    - `renamed`: key renaming applied (a stripped DDP prefix, REPA's legacy blocks), else None.
    - `pos_embed_max_abs_diff`: largest difference of the file's `pos_embed` from eqdisp's table.
    - `args`: the training arguments stored in the checkpoint (a dict), else None.
    - `steps`: the training steps stored in the checkpoint (REPA), else None.
    - `transport`: SiT's interpolant the arguments name (REPA's `cosine` is `GVP`), else None.
    - `dispersive`: whether the arguments turn the Dispersive Loss on (`--disp`).
    """

    model: DiffusionTransformer
    source: str
    kind: Literal["state dict", "training checkpoint"]
    entry: Weights | None
    skipped: tuple[str, ...]
    renamed: str | None
    pos_embed_max_abs_diff: float
    args: dict | None
    steps: int | None
    transport: TransportConfig | None
    dispersive: bool

    @property
    def model_name(self) -> str:
        return f"{self.model.family}-{_size_letter(self.model)}/{self.model.patch_size}"

    @property
    def parameter_count(self) -> int:
        """Trainable parameters (the fixed position embedding is not one)."""
        leaves = jax.tree.leaves(eqx.filter(self.model, eqx.is_inexact_array))
        return sum(math.prod(leaf.shape) for leaf in leaves)


def _size_letter(model: DiffusionTransformer) -> str:
    from .models import MODEL_SIZES

    for letter, (depth, dim, heads) in MODEL_SIZES.items():
        if (depth, dim, heads) == (model.depth, model.dim, model.num_heads):
            return letter
    raise AssertionError("a model that no name describes")  # models are built from names


def _args_dict(args: Any) -> dict | None:
    """The training arguments as a dict: `eqdisp.io` reads the `argparse.Namespace` of a
    checkpoint as an inert record whose `attributes` are the namespace's; a dict or a real
    `argparse.Namespace` is accepted as well."""
    import argparse

    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    attributes = getattr(args, "attributes", None)  # eqdisp.io.Opaque
    return dict(attributes) if isinstance(attributes, Mapping) else None


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _same_model(a: str, b: str) -> bool:
    return parse_model_name(a) == parse_model_name(b)


def _resolve_name(model_name: str | None, args: dict | None, source: str) -> str:
    named = args.get("model") if args else None
    if named is not None and not isinstance(named, str):
        named = None
    if model_name is None:
        if named is None:
            raise ConvertError(
                f"{source}: the file does not name its model: pass the model name, e.g. 'SiT-XL/2'"
            )
        try:
            parse_model_name(named)
        except ConfigError:
            raise ConvertError(
                f"{source}: args.model={named!r} is not an eqdisp model name "
                "({SiT,DiT}-{T,S,B,L,XL}/{2,4,8}): pass the model name"
            ) from None
        return named
    parse_model_name(model_name)  # ConfigError (one line) for a bad name
    if named is not None:
        try:
            same = _same_model(model_name, named)
        except ConfigError:
            same = False
        if not same:
            raise ConvertError(
                f"{source}: model {model_name!r} does not match the checkpoint's "
                f"args.model={named!r}"
            )
    return model_name


def _transport_from_args(args: dict | None, repa: bool) -> TransportConfig | None:
    """SiT's `--path-type/--prediction/--loss-weight/--train-eps/--sample-eps`, or REPA's
    `--path-type {linear,cosine}` (REPA's cosine path is SiT's GVP under t -> 1 - t)."""
    path = args.get("path_type") if args else None
    if path is None:
        return None
    if repa:
        paths = {"linear": "Linear", "cosine": "GVP"}
        if path not in paths or args.get("prediction", "v") != "v":
            raise ConvertError(
                f"args.path_type={path!r}, args.prediction={args.get('prediction')!r} are not "
                "allowed for REPA: expected path 'linear' or 'cosine' with prediction 'v'"
            )
        return TransportConfig(path=paths[path])
    weight = args.get("loss_weight")
    try:
        return TransportConfig(
            path=path,
            prediction=args.get("prediction", "velocity"),
            loss_weight="none" if weight is None else weight,
            train_eps=args.get("train_eps"),
            sample_eps=args.get("sample_eps"),
        )
    except ConfigError as error:
        raise ConvertError(f"the checkpoint's SiT arguments do not convert: {error}") from None


def _select(obj: Any, weights: Weights, source: str) -> tuple[str, Mapping, Weights | None]:
    """The state dict to convert: the file itself or its `weights` entry."""
    if not isinstance(obj, Mapping) or not obj:
        raise ConvertError(
            f"{source}: expected a state dict or a training checkpoint, found {type(obj).__name__}"
        )
    if all(isinstance(key, str) and _is_tensor(value) for key, value in obj.items()):
        if weights != "ema":
            raise ConvertError(
                f"{source}: a bare state dict holds one set of weights (a release's EMA); "
                f"weights={weights!r} needs a training checkpoint"
            )
        return "state dict", obj, None
    entries = ", ".join(map(str, obj))
    if "ema" not in obj and "model" not in obj:
        raise ConvertError(
            f"{source}: neither a state dict nor a training checkpoint (entries: {entries})"
        )
    if weights not in obj:
        other = "model" if weights == "ema" else "ema"
        raise ConvertError(
            f"{source}: no {weights!r} entry (entries: {entries}); pass weights={other!r}"
        )
    state = obj[weights]
    if not isinstance(state, Mapping):
        raise ConvertError(
            f"{source}: entry {weights!r} is a {type(state).__name__}, expected a state dict"
        )
    return "training checkpoint", state, weights


def _read(path: pathlib.Path) -> Any:
    from . import io

    if path.suffix.lower() in (".safetensors", ".npz"):
        return io.read_state_dict(path)
    return io.read_torch(path)


def read_torch_checkpoint(
    path: str | os.PathLike,
    model_name: str | None = None,
    *,
    weights: Weights = "ema",
    time_convention: Literal["sit", "repa"] | None = None,
) -> TorchCheckpoint:
    """Read a released or trained PyTorch SiT/DiT/REPA/Dispersive-Loss checkpoint (no torch needed).

    **Arguments:**

    - `path`: a `.pt`/`.pth` file (zip or legacy), or a `.safetensors`/`.npz` state dict. Accepted:
        a bare state dict (SiT-XL/2, DiT-XL/2 256 and 512 releases); a training checkpoint
        `{"model", "ema", "opt", "args"[, "steps"]}` (SiT, DiT, Dispersive-Loss and REPA `train.py`,
        REPA's release); the optimizer state is not read.
    - `model_name`: e.g. `"SiT-XL/2"`; None takes the checkpoint's `args.model`. When both are
        there they must agree.
    - `weights`: the entry of a training checkpoint: `"ema"` (what the references sample from)
        or `"model"` (the raw weights).
    - `time_convention`: None detects REPA (its `projectors.*` or its training arguments);
        `"sit"`/`"repa"` override.

    **Returns:** a `TorchCheckpoint` with the model and what was found.

    **Raises:** `ConvertError` (one line) as `torch_state_dict_to_model`, and for a missing entry,
    a model name that disagrees with the checkpoint's, REPA's `--qk-norm`; `eqdisp.io.WeightsError`
    for an unreadable file.
    """
    path = pathlib.Path(path)
    source = str(path)
    if weights not in ("ema", "model"):
        raise ConvertError(f"weights={weights!r} is not allowed: expected 'ema' or 'model'")
    if time_convention not in (None, "sit", "repa"):
        raise ConvertError(
            f"time_convention={time_convention!r} is not allowed: expected None, 'sit' or 'repa'"
        )
    obj = _read(path)
    kind, state, entry = _select(obj, weights, source)
    args = _args_dict(obj.get("args")) if kind == "training checkpoint" else None
    steps = obj.get("steps") if kind == "training checkpoint" else None
    steps = int(steps) if isinstance(steps, (int, np.integer)) else None
    name = _resolve_name(model_name, args, source)

    repa_args = bool(args) and any(k in args for k in ("enc_type", "proj_coeff", "encoder_depth"))
    if args and args.get("qk_norm"):
        raise ConvertError(
            f"{source}: args.qk_norm=True: REPA's qk_norm is not implemented in eqdisp "
            "(only checkpoints trained without --qk-norm convert)"
        )
    if time_convention is None and repa_args:
        time_convention = "repa"
    expect = {}
    if args:
        if isinstance(args.get("num_classes"), int):
            expect["num_classes"] = args["num_classes"]
        pixels = args.get("resolution", args.get("image_size"))
        if isinstance(pixels, int) and pixels % 8 == 0:
            expect["input_size"] = pixels // 8  # the SD-VAE's downsampling
    try:
        converted = _convert(state, name, time_convention=time_convention, **expect)
    except ConvertError as error:
        raise ConvertError(f"{source} ({entry or kind}): {error}") from None
    repa = converted.model.time_convention == "repa"
    return TorchCheckpoint(
        model=converted.model,
        source=source,
        kind=kind,
        entry=entry,
        skipped=converted.skipped,
        renamed=converted.renamed,
        pos_embed_max_abs_diff=converted.pos_embed_max_abs_diff,
        args=args,
        steps=steps,
        transport=None if converted.model.family == "DiT" else _transport_from_args(args, repa),
        dispersive=bool(args and args.get("disp")),
    )


def from_torch(
    path: str | os.PathLike,
    model_name: str | None = None,
    *,
    weights: Weights = "ema",
    time_convention: Literal["sit", "repa"] | None = None,
) -> DiffusionTransformer:
    """The transformer of a PyTorch SiT/DiT/REPA/Dispersive-Loss checkpoint file.

    `read_torch_checkpoint(...).model`; see there for the arguments and the accepted files.
    """
    return read_torch_checkpoint(
        path, model_name, weights=weights, time_convention=time_convention
    ).model


# ----------------------------------------------------------------------------------------------
# A run directory


CONVERSION_FILE = "conversion.json"
"""What `convert_checkpoint` found, written in the run directory (`<run>/conversion.json`)."""


def _experiment(ckpt: TorchCheckpoint, out_run: pathlib.Path, vae: str | None) -> ExperimentConfig:
    """The run config of a converted checkpoint: its model, the references' objective, optimizer
    and sampler, latent data."""
    model = ckpt.model
    repa = model.time_convention == "repa"
    model_config = ModelConfig(
        name=ckpt.model_name,
        input_size=model.input_size,
        in_channels=model.in_channels,
        num_classes=model.num_classes,
        learn_sigma=model.learn_sigma,
        time_convention=model.time_convention,
    )
    if repa:
        # REPA's README evaluation: SDE (Euler-Maruyama, sigma diffusion, 0.04 mean last step),
        # 250 steps, guidance 1.8 on all channels for t_REPA <= 0.7; AdamW (0.9, 0.999), clip 1.0.
        sampler = SamplerConfig(
            mode="sde", steps=250, cfg_scale=1.8, cfg_channels=None, cfg_interval=(0.3, 1.0)
        )
        optim = OptimConfig(b2=0.999, grad_clip=1.0)
    elif model.family == "DiT":
        # DiT: 250 respaced DDPM steps; guidance (when asked for) on 3 channels as forward_with_cfg.
        sampler = SamplerConfig(steps=250, cfg_channels=3)
        optim = OptimConfig(b2=0.999)
    else:
        # SiT and the Dispersive-Loss release: the paper's ODE (Heun, 250 grid points); guidance
        # on 3 channels as SiT's forward_with_cfg. PyTorch AdamW betas (0.9, 0.999).
        sampler = SamplerConfig(cfg_channels=3)
        optim = OptimConfig(b2=0.999)
    # A Dispersive-Loss run (`--disp`) trained with the public PyTorch code's settings.
    disp = DISP_PRESETS["reference-pytorch"] if ckpt.dispersive else DISP_PRESETS["none"]
    return ExperimentConfig(
        model=model_config,
        disp=disp,
        transport=ckpt.transport or TransportConfig(),
        optim=optim,
        data=DataConfig(
            source="latents", image_size=8 * model.input_size, flip=not repa, vae=vae
        ),
        sampler=sampler,
        train=RunConfig(out=str(out_run)),
    )


def convert_checkpoint(
    src: str | os.PathLike,
    out_run: str | os.PathLike,
    model_name: str | None = None,
    *,
    weights: Weights = "ema",
    vae: str | os.PathLike | None = None,
    time_convention: Literal["sit", "repa"] | None = None,
) -> pathlib.Path:
    """Write a PyTorch SiT/DiT/REPA/Dispersive-Loss checkpoint as an eqdisp run directory.

    The run has one checkpoint, step 0: model and EMA both the converted weights, a fresh
    optimizer state; its config names the model with what the file determined (input size,
    channels, classes, learned sigma, time convention), `data.source="latents"`, `data.vae=vae`,
    the objective of the family (DiT's diffusion or SiT's transport, from the checkpoint's
    arguments when it has them) and the sampler of the paper (SiT/Dispersive Loss: ODE Heun, 250
    points; DiT: 250 DDPM steps; REPA: SDE 250 steps, guidance 1.8 on (0.3, 1.0)).
    `eqdisp.load_checkpoint`, `cli.sample`, `cli.analyze`, `cli.evaluate` and `--init-from` read it.
    What the conversion found is written to `<out_run>/conversion.json`.

    **Arguments:**

    - `src`: the checkpoint file (see `read_torch_checkpoint`).
    - `out_run`: the run directory to create; must not exist or be empty.
    - `model_name`, `weights`, `time_convention`: as `read_torch_checkpoint`.
    - `vae`: the SD-VAE weights that decode the latents (stored as an absolute path).

    **Returns:** the run directory.

    **Raises:** `ConvertError` (one line) for an existing non-empty `out_run`, a missing `vae`, and
    everything `read_torch_checkpoint` raises.
    """
    import json

    from .train import Checkpointer, init_train_state, make_optimizer

    out_run = pathlib.Path(out_run).absolute()
    if out_run.exists() and (not out_run.is_dir() or any(out_run.iterdir())):
        raise ConvertError(f"{out_run} exists and is not empty: pass a new run directory")
    if vae is not None:
        vae = pathlib.Path(vae).absolute()
        if not vae.exists():
            raise ConvertError(f"vae={str(vae)!r}: no such file or directory")
        vae = str(vae)
    ckpt = read_torch_checkpoint(src, model_name, weights=weights, time_convention=time_convention)
    config = _experiment(ckpt, out_run, vae)


    _, key_train = jr.split(jr.key(config.train.seed))  # the train key abstract_train_state uses
    state = init_train_state(ckpt.model, make_optimizer(config.optim), key=key_train)
    out_run.mkdir(parents=True, exist_ok=True)
    with Checkpointer(out_run / "checkpoints", keep=1) as checkpointer:
        checkpointer.save(0, state, config=config, force=True)
    report = {
        "source": str(pathlib.Path(src).absolute()),
        "kind": ckpt.kind,
        "entry": ckpt.entry,
        "model": ckpt.model_name,
        "parameters": ckpt.parameter_count,
        "input_size": ckpt.model.input_size,
        "in_channels": ckpt.model.in_channels,
        "num_classes": ckpt.model.num_classes,
        "learn_sigma": ckpt.model.learn_sigma,
        "time_convention": ckpt.model.time_convention,
        "skipped": list(ckpt.skipped),
        "renamed": ckpt.renamed,
        "pos_embed_max_abs_diff": ckpt.pos_embed_max_abs_diff,
        "steps": ckpt.steps,
        "dispersive": ckpt.dispersive,
    }
    write_text_atomically(out_run / CONVERSION_FILE, json.dumps(report, indent=2) + "\n")
    return out_run


__all__ = [
    "CONVERSION_FILE",
    "POS_EMBED_ATOL",
    "ConvertError",
    "TorchCheckpoint",
    "convert_checkpoint",
    "from_torch",
    "model_to_torch_state_dict",
    "read_torch_checkpoint",
    "torch_state_dict_shapes",
    "torch_state_dict_to_model",
]
