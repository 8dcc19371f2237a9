"""State dicts from any weight file (`.safetensors`, `.npz`, PyTorch), told apart by content."""

import os
import pathlib
import zipfile
from collections.abc import Mapping
from typing import Any, Literal

import ml_dtypes  # registers bfloat16 / float8 with NumPy, which safetensors' NumPy API needs
import numpy as np
import safetensors

from ._errors import WeightsError
from ._torch import Opaque, TorchTensor, _existing_file, _first_line, _is_zip, read_torch

Format = Literal["safetensors", "npz", "torch"]

# Dtypes NumPy lacks natively; safetensors hands them over as ml_dtypes arrays, read as float32.
_WIDENED = frozenset(
    np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
)
_SAFETENSORS_DTYPES = {  # safetensors dtype code -> the dtype read_state_dict returns
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "float32",
    "F8_E4M3": "float32", "F8_E5M2": "float32", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool", "C64": "complex64",
}  # fmt: skip


def _format(path: pathlib.Path) -> Format:
    """What the file is, from its content (the suffix may be anything)."""
    try:
        with open(path, "rb") as file:
            head = file.read(9)
        if _is_zip(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            if any(n.endswith("/data.pkl") and n.count("/") == 1 for n in names):
                return "torch"
            if all(n.endswith(".npy") for n in names):
                return "npz"
        # Safetensors before pickles: its u64 header length may start with the byte 0x80 too. A
        # legacy torch file cannot pass this test (its byte 8 belongs to the magic number).
        elif len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
            return "safetensors"
        elif head[:1] == b"\x80":  # a pickle (protocol >= 2): torch's legacy format
            return "torch"
    except (OSError, zipfile.BadZipFile) as error:
        raise WeightsError(f"cannot read {path}: {_first_line(error)}") from None
    raise WeightsError(
        f"{path} is not a weight file: expected .safetensors, .npz, or a PyTorch file "
        "(torch.save: .pth .pt .bin .ckpt)"
    )


def _is_tensor(value: Any) -> bool:
    return isinstance(value, TorchTensor)


def _is_unreadable_tensor(value: Any) -> bool:
    """A tensor the reader cannot decode (quantized, sparse, an unknown dtype), kept as a record."""
    return isinstance(value, Opaque) and value.qualname.startswith(
        ("torch._utils._rebuild", "torch._tensor._rebuild")
    )


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(
        _is_tensor(v) or _is_unreadable_tensor(v) for v in value.values()
    )


def _kind(value: Any) -> str:
    """A short description of one entry of a file."""
    if isinstance(value, TorchTensor):
        return f"tensor {value.dtype} {value.shape}"
    if isinstance(value, Mapping):
        if _is_state_dict(value):
            count = sum(map(_is_tensor, value.values()))
            return f"state dict of {count} tensors"
        return f"mapping of {len(value)} entries"
    if isinstance(value, type) and issubclass(value, Opaque):
        return f"reference to {value.qualname}"
    if isinstance(value, Opaque):
        return value.qualname
    if isinstance(value, list | tuple):
        return f"{type(value).__name__} of {len(value)} items"
    if value is None or isinstance(value, bool | int | float | str):
        text = f"{type(value).__name__} {value!r}"
        return text if len(text) <= 60 else text[:57] + "..."
    return type(value).__name__


def _entries_with_state_dicts(obj: Any) -> list[str]:
    return [str(k) for k, v in obj.items() if _is_state_dict(v)] if isinstance(obj, Mapping) else []


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _choose(obj: Any, path: pathlib.Path, entry: str | None) -> Mapping:
    """The mapping of tensors `read_state_dict` returns: the file's, or its entry `entry`."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds no state dict (its top level is {_kind(obj)})")
    nested = _entries_with_state_dicts(obj)
    if entry is None:
        if nested:
            raise WeightsError(
                f"{path} holds a training checkpoint with state dicts {_quoted(nested)}; "
                "choose one with entry=..."
            )
        if not _is_state_dict(obj):
            raise WeightsError(f"{path} holds no tensors (entries: {_quoted(list(map(str, obj)))})")
        return obj
    found = [v for k, v in obj.items() if str(k) == entry]
    offer = f"its state dicts are {_quoted(nested)}" if nested else "it holds no nested state dicts"
    if not found:
        raise WeightsError(f"{path} has no entry {entry!r}; {offer}")
    if not _is_state_dict(found[0]):
        raise WeightsError(
            f"entry {entry!r} of {path} is not a state dict ({_kind(found[0])}); {offer}"
        )
    return found[0]


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with safetensors.safe_open(path, framework="numpy") as file:
            # offset_keys: file order (safetensors >= 0.5); keys() is sorted by name.
            keys = file.offset_keys() if hasattr(file, "offset_keys") else file.keys()
            state = {key: np.array(file.get_tensor(key)) for key in keys}
    except (safetensors.SafetensorError, OSError, ValueError, TypeError, KeyError) as error:
        raise WeightsError(f"cannot read {path} as .safetensors: {_first_line(error)}") from None
    return {k: v.astype(np.float32) if v.dtype in _WIDENED else v for k, v in state.items()}


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            state = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise WeightsError(f"cannot read {path} as .npz: {_first_line(error)}") from None
    for key, value in state.items():
        # np.load hands back a member without a .npy header as its bytes
        if not isinstance(value, np.ndarray):
            raise WeightsError(f"cannot read {path} as .npz: member {key}.npy is not a NumPy array")
    return state


def read_state_dict(path: str | os.PathLike, *, entry: str | None = None) -> dict[str, np.ndarray]:
    """Read a state dict (name -> array) from a weight file, whatever its format.

    **Arguments:**

    - `path`: a `.safetensors` file, an `.npz`, or a PyTorch file (zip or legacy format; any
        suffix: `.pth`, `.pt`, `.bin`, `.ckpt`). The format is told by content, not suffix.
    - `entry`: for a PyTorch file holding several state dicts (a training checkpoint such as
        SiT's `{"model", "ema", "opt", "args"}`, or Lightning's `{"state_dict", ...}`), the
        top-level entry to read, e.g. `"ema"`. Only that entry's tensors are read from disk.

    **Returns:** name -> NumPy array, in file order, materialised. bfloat16 and float8 tensors
    widen to float32 (exactly); non-tensor values of the mapping (ints, strings, ...) are skipped.

    **Raises:** `WeightsError` (one line, naming the file): missing, unreadable or corrupt file,
    unknown format; a checkpoint with several state dicts and no `entry` (the message lists
    them); an `entry` that is absent or not a state dict, or given for a flat file.
    """
    path = _existing_file(path)
    kind = _format(path)
    if kind != "torch":
        if entry is not None:
            raise WeightsError(
                f"{path} is a flat .{kind} file of tensors; entry={entry!r} applies only to "
                "PyTorch checkpoints that hold several state dicts"
            )
        return _read_safetensors(path) if kind == "safetensors" else _read_npz(path)
    mapping = _choose(read_torch(path), path, entry)
    state = {}
    for key, value in mapping.items():
        if _is_unreadable_tensor(value):
            raise WeightsError(
                f"cannot read {path}: tensor {key!s} is built by {value.qualname}, which this "
                "reader does not decode (quantized, sparse or an unsupported dtype)"
            )
        if _is_tensor(value):
            state[str(key)] = value.numpy()
    return state


def state_dict_entries(path: str | os.PathLike) -> list[str]:
    """The top-level entries of a PyTorch checkpoint that hold state dicts, in file order.

    `[]` for a flat state dict, a `.safetensors` or an `.npz` file. A loader that takes either
    a released EMA-only file or a training checkpoint writes
    `read_state_dict(path, entry="ema" if "ema" in state_dict_entries(path) else None)`.

    **Raises:** `WeightsError` (one line) as `read_state_dict`.
    """
    path = _existing_file(path)
    return _entries_with_state_dicts(read_torch(path)) if _format(path) == "torch" else []


def describe(path: str | os.PathLike) -> dict[str, str]:
    """What a weight file holds, without reading any tensor data: top-level entry -> kind.

    Kinds read like `"tensor float32 (1152, 4, 2, 2)"`, `"state dict of 675 tensors"`,
    `"mapping of 2 entries"`, `"argparse.Namespace"` (a record of an object; see `Opaque`),
    `"int 400000"`. A file whose top level is not a mapping is described under the key `""`.

    **Raises:** `WeightsError` (one line) as `read_state_dict`.
    """
    path = _existing_file(path)
    kind = _format(path)
    if kind == "torch":
        obj = read_torch(path)
        return (
            {str(k): _kind(v) for k, v in obj.items()}
            if isinstance(obj, Mapping)
            else {"": _kind(obj)}
        )
    try:
        if kind == "safetensors":
            with safetensors.safe_open(path, framework="numpy") as file:
                keys = file.offset_keys() if hasattr(file, "offset_keys") else file.keys()
                slices = {key: file.get_slice(key) for key in keys}
                return {
                    key: f"tensor {_SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype())} "
                    f"{tuple(s.get_shape())}"
                    for key, s in slices.items()
                }
        described = {}
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(member)
                described[name.removesuffix(".npy")] = f"tensor {dtype} {shape}"
        return described
    except (safetensors.SafetensorError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise WeightsError(f"cannot read {path} as .{kind}: {_first_line(error)}") from None
