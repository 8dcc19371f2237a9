"""PyTorch files (`torch.save`, zip and legacy formats) read without torch, lazily and inertly.

`torch.save` pickles the object with each tensor's bytes kept apart: in the zip format (torch >=
1.6) as archive members `<root>/data/<key>` beside `<root>/data.pkl`; in the legacy format (torch
< 1.6, or `_use_new_zipfile_serialization=False`) as a run of `(int64 numel, bytes)` records after
five pickles (magic number, protocol, system info, the object, the storage keys). The reader
unpickles the object once and leaves every tensor as a `TorchTensor` that knows where its bytes
are, so reading the EMA weights of an 11 GB training checkpoint reads neither the model nor the
optimizer state.

No callable named in the file is ever called. The unpickler resolves a fixed set of globals to its
own functions (tensor and parameter rebuilding, storage types, `collections.OrderedDict`, and the
`_codecs.encode` / `set` / `frozenset` that pickle protocol 2 uses for bytes and sets); any other
global becomes an `Opaque` class, whose "calls" only record their arguments.
"""

import collections
import io
import os
import pathlib
import pickle
import reprlib
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, ClassVar

import ml_dtypes  # a JAX dependency; its float8 types decode torch's float8 tensors
import numpy as np

from ._errors import WeightsError

# torch dtype name -> dtype of its bytes in the file (little-endian; big-endian files swap).
_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "float64": "<f8",
        "float32": "<f4",
        "float16": "<f2",
        "bfloat16": "<u2",  # no NumPy bfloat16: the bits are read as uint16 and widened
        "complex128": "<c16",
        "complex64": "<c8",
        "int64": "<i8",
        "int32": "<i4",
        "int16": "<i2",
        "int8": "i1",
        "uint64": "<u8",
        "uint32": "<u4",
        "uint16": "<u2",
        "uint8": "u1",
        "bool": "?",
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
        "float8_e5m2": ml_dtypes.float8_e5m2,
    }.items()
}
_WIDENED = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})  # read as float32

# Pickled storage class (GLOBAL torch.<name>) -> torch dtype name of its elements.
_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",  # with _rebuild_tensor_v3, which names the tensor's dtype
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def _result_dtype(name: str) -> np.dtype:
    return np.dtype(np.float32) if name in _WIDENED else _DTYPES[name].newbyteorder("=")


# ----------------------------------------------------------------------------------------------
# Records of what the reader does not run


class _Sealed:
    """The reader's own objects that a pickle can reach: its BUILD opcode may not modify them
    (it would set attributes, e.g. a tensor's shape past its storage)."""

    def __setstate__(self, state: Any):
        raise pickle.UnpicklingError(f"the file tries to modify the reader's {type(self).__name__}")


class Opaque:
    """What the file builds from a global the reader does not run: a record, never the object.

    Each such global (`module.name`) reads as a subclass of `Opaque` whose `qualname` is that
    name; "calling" it (pickle's REDUCE / NEWOBJ) makes an instance that records the arguments,
    and pickle's BUILD stores the object's state. So the `args` entry of a SiT / DiT / REPA
    checkpoint (an `argparse.Namespace`) reads as a record with `qualname == "argparse.Namespace"`
    whose attributes are `record.get("model")`, `record.attributes` or plainly `record.model`.

    **Attributes:**

    - `qualname`: the global's `module.name`, e.g. `"argparse.Namespace"`, `"numpy.dtype"`.
    - `args`, `kwargs`: the constructor arguments in the file.
    - `state`: what BUILD set (an attribute dict, or `(dict, slots)`), `None` without BUILD.
    - `listitems`, `dictitems`: items pickle appended / assigned to the object.
    """

    qualname: ClassVar[str] = "?"
    args: tuple
    kwargs: dict
    state: Any
    listitems: list
    dictitems: dict

    def __new__(cls, *args: Any, **kwargs: Any):
        record = object.__new__(cls)
        record.args, record.kwargs, record.state = args, kwargs, None
        record.listitems, record.dictitems = [], {}
        return record

    def __init__(self, *args: Any, **kwargs: Any):
        del args, kwargs  # already recorded by __new__ (pickle's REDUCE calls the class)

    def __setstate__(self, state: Any):
        self.state = state

    def __setitem__(self, key: Any, value: Any):
        self.dictitems[key] = value

    def append(self, value: Any):
        self.listitems.append(value)

    def extend(self, values: Any):
        self.listitems.extend(values)

    @property
    def attributes(self) -> dict[str, Any]:
        """The attribute dict that BUILD gave the object (`{}` if none)."""
        state = self.__dict__.get("state")
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            merged = dict(state[0]) if isinstance(state[0], dict) else {}
            merged.update(state[1] if isinstance(state[1], dict) else {})
            return merged
        return dict(state) if isinstance(state, dict) else {}

    def get(self, name: str, default: Any = None) -> Any:
        """The recorded object's attribute `name` (e.g. `args.get("model")`), else `default`."""
        return self.attributes.get(name, default)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails, so `args`, `state`, ... keep their meaning here.
        if not name.startswith("__"):
            attributes = self.attributes
            if name in attributes:
                return attributes[name]
        raise AttributeError(f"the {self.qualname} record has no attribute {name!r}")

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        text = f"Opaque[{self.qualname}]({', '.join(parts)})"
        if self.state is not None:
            text += f" with state {self.state!r}"
        return text if len(text) <= 200 else text[:197] + "..."


_OPAQUE_CLASSES: dict[str, type[Opaque]] = {}


def _opaque_class(qualname: str) -> type[Opaque]:
    if qualname not in _OPAQUE_CLASSES:
        name = f"Opaque[{qualname}]"
        _OPAQUE_CLASSES[qualname] = type(
            name, (Opaque,), {"qualname": qualname, "__qualname__": name, "__module__": __name__}
        )
    return _OPAQUE_CLASSES[qualname]


# ----------------------------------------------------------------------------------------------
# Where the bytes are


class _ZipSource:
    """The storages of a zip-format file: archive members, read without re-reading the directory."""

    def __init__(self, path: pathlib.Path, prefix: str, byteorder: str, members: dict):
        self.path, self.prefix, self.byteorder, self.members = path, prefix, byteorder, members

    def read(self, key: str, start: int, count: int) -> bytes:
        name = f"{self.prefix}data/{key}"
        info = self.members.get(name)
        if info is None:
            raise WeightsError(f"cannot read {self.path}: the archive has no member {name}")
        if start + count > info.file_size:
            raise WeightsError(
                f"cannot read {self.path}: member {name} is shorter than its tensors"
            )
        whole = start == 0 and count == info.file_size
        with open(self.path, "rb") as file:
            file.seek(info.header_offset)
            header = file.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise WeightsError(f"cannot read {self.path}: corrupt zip header of {name}")
            name_size, extra_size = struct.unpack("<HH", header[26:30])
            file.seek(info.header_offset + 30 + name_size + extra_size)
            if info.flag_bits & 0x1:
                raise WeightsError(f"cannot read {self.path}: member {name} is encrypted")
            if info.compress_type == zipfile.ZIP_STORED:
                file.seek(start, os.SEEK_CUR)  # torch stores members uncompressed: read a slice
                data, skip = file.read(count), 0
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                data, skip, whole = zlib.decompress(file.read(info.compress_size), -15), start, True
            else:
                raise WeightsError(
                    f"cannot read {self.path}: member {name} uses zip compression method "
                    f"{info.compress_type}; stored and deflated are supported"
                )
        if len(data) < (info.file_size if whole else count):
            raise WeightsError(f"cannot read {self.path}: member {name} is truncated")
        if whole and zlib.crc32(data) != info.CRC:
            raise WeightsError(f"cannot read {self.path}: member {name} is corrupt (bad CRC-32)")
        return data[skip : skip + count]


class _LegacySource:
    """The storages of a legacy-format file: `(numel, bytes)` records at known file offsets."""

    def __init__(self, path: pathlib.Path):
        self.path, self.byteorder = path, "little"
        self.records: dict[str, tuple[int, int]] = {}  # key -> (offset of its numel, numel)

    def read(self, key: str, start: int, count: int) -> bytes:
        if key not in self.records:
            raise WeightsError(f"cannot read {self.path}: storage {key} is not in its storage list")
        offset, numel = self.records[key]
        with open(self.path, "rb") as file:
            file.seek(offset)
            head = file.read(8)
            if len(head) == 8:
                file.seek(start, os.SEEK_CUR)
                data = file.read(count)
        if len(head) < 8 or len(data) < count:
            raise WeightsError(f"cannot read {self.path}: storage {key} is truncated")
        (stored,) = struct.unpack("<q" if self.byteorder == "little" else ">q", head)
        if stored != numel:
            raise WeightsError(
                f"cannot read {self.path}: storage {key} holds {stored} values, expected {numel}"
            )
        return data


class _Storage(_Sealed):
    """A storage the pickle names: `nbytes` bytes from `start` of the root storage `key`."""

    def __init__(self, source: Any, key: str, dtype: str, nbytes: int, start: int = 0):
        self.source, self.key, self.dtype = source, key, dtype
        self.nbytes, self.start = nbytes, start


class _StorageType(_Sealed):
    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGES[name]


# ----------------------------------------------------------------------------------------------
# Tensors


class TorchTensor(_Sealed):
    """A tensor of a PyTorch file, read lazily: only `numpy()` (or `np.asarray`) reads its bytes.

    **Attributes:**

    - `shape`: the tensor's shape, a tuple of ints.
    - `dtype`: the NumPy dtype `numpy()` returns (bfloat16 and float8 tensors widen to float32,
        exactly; other dtypes are kept, in native byte order).
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    def __init__(
        self,
        storage: _Storage,
        dtype: str,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
    ):
        self._storage, self._raw = storage, _DTYPES[dtype]
        self._widen = dtype if dtype in _WIDENED else None
        self._offset, self._stride = offset, stride
        self.shape, self.dtype = shape, _result_dtype(dtype)
        if any(n < 0 for n in shape) or offset < 0 or any(s < 0 for s in stride):
            raise pickle.UnpicklingError("a tensor has a negative size, offset or stride")
        if len(stride) != len(shape):
            raise pickle.UnpicklingError("a tensor's stride does not match its shape")
        if 0 not in shape and self._span() * self._raw.itemsize > storage.nbytes:
            raise pickle.UnpicklingError(f"a tensor reaches outside its storage {storage.key}")

    def _span(self) -> int:
        """Storage elements up to and including the tensor's last one."""
        return self._offset + sum((n - 1) * s for n, s in zip(self.shape, self._stride)) + 1

    def numpy(self) -> np.ndarray:
        """Read the tensor's bytes (and no others) into a new C-contiguous array of `dtype`.

        **Raises:** `WeightsError` (one line, naming the file) if its bytes are missing or corrupt.
        """
        if 0 in self.shape:
            return np.zeros(self.shape, self.dtype)
        itemsize = self._raw.itemsize
        first = self._offset
        count = self._span() - first
        source = self._storage.source
        data = source.read(
            self._storage.key, self._storage.start + first * itemsize, count * itemsize
        )
        raw = self._raw
        if itemsize > 1 and source.byteorder == "big":
            raw = raw.newbyteorder(">")
        flat = np.frombuffer(data, raw)
        strides = tuple(s * itemsize for s in self._stride)
        view = np.lib.stride_tricks.as_strided(flat, self.shape, strides, writeable=False)
        if self._widen == "bfloat16":  # bfloat16 is the top half of a float32
            return (view.astype(np.uint32, order="C") << 16).view(np.float32)
        return view.astype(self.dtype, order="C")  # a copy in native byte order (float8 -> float32)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"TorchTensor(shape={self.shape}, dtype={self.dtype})"


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> TorchTensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    shape = tuple(int(n) for n in size)
    return TorchTensor(
        storage, dtype or storage.dtype, int(offset), shape, tuple(int(s) for s in stride)
    )


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> Any:
    # torch._utils._rebuild_tensor(storage, offset, size, stride) and _rebuild_tensor_v2(...,
    # requires_grad, backward_hooks[, metadata]): the storage's type gives the dtype.
    return _tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> Any:
    # torch._utils._rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[,
    # metadata]): an UntypedStorage and the dtypes without a storage class (uint16/32/64, float8).
    qualname = getattr(rest[2], "qualname", "") if len(rest) >= 3 else ""
    if not qualname.startswith("torch.") or qualname[len("torch.") :] not in _DTYPES:
        return _opaque_class("torch._utils._rebuild_tensor_v3")(
            storage, offset, size, stride, *rest
        )
    return _tensor(storage, offset, size, stride, qualname[len("torch.") :])


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    # torch._utils._rebuild_parameter(data, requires_grad, backward_hooks) and
    # _rebuild_parameter_with_state(..., state): an nn.Parameter reads as its tensor.
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # torch._tensor._rebuild_from_type_v2: a tensor subclass or a tensor with Python attributes;
    # `func` is what find_class returned, so one of ours or an Opaque class (inert either way).
    if func in _TENSOR_REBUILDERS:
        return func(*args)
    return _opaque_class("torch._tensor._rebuild_from_type_v2")(func, new_type, args, state)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # copyreg._reconstructor (pickle protocols 0 and 1): an instance of `cls`, then BUILD.
    if isinstance(cls, type) and issubclass(cls, Opaque):
        return cls()
    return _opaque_class("copyreg._reconstructor")(cls, base, state)


def _encode(text: Any, encoding: Any = "utf-8") -> Any:
    # _codecs.encode(str, "latin1") is how pickle protocol 2 writes `bytes`.
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin1")
    return _opaque_class("_codecs.encode")(text, encoding)


def _set(items: Any = ()) -> Any:
    return set(items) if isinstance(items, list | tuple) else _opaque_class("builtins.set")(items)


def _frozenset(items: Any = ()) -> Any:
    if isinstance(items, list | tuple):
        return frozenset(items)
    return _opaque_class("builtins.frozenset")(items)


class _Trusted(_Sealed):
    """One of the reader's own callables, as `find_class` hands it out (sealed: a BUILD on a bare
    function would set attributes such as `__defaults__` on the reader's function)."""

    def __init__(self, func: Callable[..., Any]):
        self.func = func

    def __call__(self, *args: Any) -> Any:
        return self.func(*args)


_REBUILD_TENSOR, _REBUILD_TENSOR_V3, _REBUILD_PARAMETER = (
    _Trusted(_rebuild_tensor),
    _Trusted(_rebuild_tensor_v3),
    _Trusted(_rebuild_parameter),
)
_TENSOR_REBUILDERS = (_REBUILD_TENSOR, _REBUILD_TENSOR_V3, _REBUILD_PARAMETER)
_SET, _FROZENSET = _Trusted(_set), _Trusted(_frozenset)
_GLOBALS: dict[str, _Trusted] = {
    "collections.OrderedDict": _Trusted(collections.OrderedDict),
    "torch._utils._rebuild_tensor": _REBUILD_TENSOR,
    "torch._utils._rebuild_tensor_v2": _REBUILD_TENSOR,
    "torch._utils._rebuild_tensor_v3": _REBUILD_TENSOR_V3,
    "torch._utils._rebuild_parameter": _REBUILD_PARAMETER,
    "torch._utils._rebuild_parameter_with_state": _REBUILD_PARAMETER,
    "torch._tensor._rebuild_from_type_v2": _Trusted(_rebuild_from_type_v2),
    "copyreg._reconstructor": _Trusted(_reconstructor),
    "_codecs.encode": _Trusted(_encode),
    "builtins.set": _SET,
    "builtins.frozenset": _FROZENSET,
    "__builtin__.set": _SET,  # Python 2 names, from legacy files written under Python 2
    "__builtin__.frozenset": _FROZENSET,
}


class _Unpickler(pickle.Unpickler):
    """Rebuilds tensors as `TorchTensor`s and every unknown global as an `Opaque` class."""

    def __init__(self, file: Any, source: Any, storages: dict[str, _Storage]):
        super().__init__(file, encoding="utf-8")  # torch.load's default for Python 2 strings
        self.source, self.storages = source, storages

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if qualname in _GLOBALS:
            return _GLOBALS[qualname]
        # torch.FloatStorage, ... (legacy storage classes), torch.storage.UntypedStorage
        if module in ("torch", "torch.storage") and name in _STORAGES:
            return _StorageType(name)
        return _opaque_class(qualname)

    def persistent_load(self, pid: Any) -> Any:
        # zip: ("storage", type, key, location, numel); legacy: the same + (view_metadata,);
        # legacy whole-module saves also name the module's class: ("module", cls, file, source).
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4:
            return pid[1]
        if kind != "storage" or len(pid) not in (5, 6):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.80}")
        itemsize = _DTYPES[storage_type.dtype].itemsize
        root = self.storages.setdefault(
            key, _Storage(self.source, key, storage_type.dtype, numel * itemsize)
        )
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        view_key, offset, view_numel = str(view[0]), int(view[1]), int(view[2])
        if offset < 0 or view_numel < 0 or (offset + view_numel) * itemsize > root.nbytes:
            raise pickle.UnpicklingError(f"storage view {view_key} reaches outside storage {key}")
        return self.storages.setdefault(
            view_key,
            _Storage(
                self.source, key, storage_type.dtype, view_numel * itemsize, offset * itemsize
            ),
        )


# ----------------------------------------------------------------------------------------------
# Files


def _load_zip(path: pathlib.Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{path} is a zip file but not a PyTorch file (no <root>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in members:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise pickle.UnpicklingError(f"unknown byte order {byteorder!r:.20}")
        data = archive.read(pickles[0])
    source = _ZipSource(path, prefix, byteorder, members)
    return _Unpickler(io.BytesIO(data), source, {}).load()


def _load_legacy(path: pathlib.Path) -> Any:
    source = _LegacySource(path)
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as file:
        if _Unpickler(file, source, storages).load() != _LEGACY_MAGIC:
            raise WeightsError(f"{path} is not a PyTorch file (no torch.save magic number)")
        if _Unpickler(file, source, storages).load() != _LEGACY_PROTOCOL:
            raise pickle.UnpicklingError("unsupported legacy protocol version")
        sys_info = _Unpickler(file, source, storages).load()
        source.byteorder = "little" if sys_info.get("little_endian", True) else "big"
        obj = _Unpickler(file, source, storages).load()
        keys = _Unpickler(file, source, storages).load()
        offset = file.tell()  # the C unpickler stops right after the pickle's STOP opcode
    for key in keys:
        storage = storages.get(str(key))
        if storage is None or storage.key != str(key):
            raise pickle.UnpicklingError(f"storage {key} is listed but no tensor uses it")
        numel = storage.nbytes // _DTYPES[storage.dtype].itemsize
        source.records[str(key)] = (offset, numel)
        offset += 8 + storage.nbytes
    return obj


def read_torch(path: str | os.PathLike) -> Any:
    """Read a `torch.save` file (zip or legacy format, any suffix) without torch and lazily.

    **Arguments:**

    - `path`: the file (`.pth`, `.pt`, `.bin`, `.ckpt`, ...).

    **Returns:** the unpickled object: dicts (`OrderedDict`s stay so), lists, tuples, ints,
    floats, strings, bytes, sets and `None` as themselves; tensors and `nn.Parameter`s as
    `TorchTensor` (nothing read yet); any other object as an `Opaque` record (e.g. the
    `argparse.Namespace` under `"args"` of a training checkpoint). No code from the file runs.

    **Raises:** `WeightsError` (one line, naming the file) if it is missing, not a PyTorch file,
    or corrupt.
    """
    path = _existing_file(path)
    try:
        return _load_zip(path) if _is_zip(path) else _load_legacy(path)
    except WeightsError:
        raise
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        OSError,
        KeyError,
        IndexError,
        struct.error,
        ValueError,
        TypeError,
        AttributeError,
        UnicodeDecodeError,
        OverflowError,
        MemoryError,
        RecursionError,
    ) as error:
        raise WeightsError(f"cannot read {path} as a PyTorch file: {_first_line(error)}") from None


def _is_zip(path: pathlib.Path) -> bool:
    # By the first bytes, as torch does: the end-of-archive search of zipfile.is_zipfile can be
    # fooled by tensor bytes at the end of a legacy file.
    with open(path, "rb") as file:
        return file.read(4) in (b"PK\x03\x04", b"PK\x05\x06")  # a member first; an empty archive


def _existing_file(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise WeightsError(f"weight file {path} {what}")
    return path


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
