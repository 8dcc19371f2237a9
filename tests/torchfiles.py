"""Write `torch.save`-format files without torch, for tests of the readers in `eqdisp.io`.

`write_torch_file(path, obj)` pickles `obj` as `torch.save` would (protocol 2), in the zip format
or, with `legacy=True`, the pre-1.6 format. Inside `obj`:

- NumPy arrays become tensors, each with its own storage (float64/32/16, ml_dtypes.bfloat16,
  int64/32/16/8, uint8, bool as legacy storage classes with `_rebuild_tensor_v2`; uint16/32/64
  as an `UntypedStorage` with `_rebuild_tensor_v3`, as torch 2 does);
- `TensorView(storage, offset, shape, stride)` is a strided view of a shared `Storage` (`.t()`,
  slices, several tensors on one buffer);
- dicts, `OrderedDict`s, lists, tuples, ints, floats, strings, bools, None pickle as themselves;
  `argparse.Namespace` pickles as in SiT / DiT / REPA checkpoints (GLOBAL argparse Namespace,
  NEWOBJ, BUILD with its attribute dict);
- `Reduce(Global(module, name), args, state)` is an arbitrary call the file asks for (e.g.
  `os.system`), to test that readers never make it; `Global(module, name)` a bare reference.

Example, a SiT-style training checkpoint::

    write_torch_file(path, {"model": sd, "ema": sd, "opt": {"state": {0: {...}},
        "param_groups": [...]}, "args": argparse.Namespace(model="SiT-XL/2")})
"""

import collections
import io
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001

_STORAGE_CLASSES = {
    np.dtype("float64"): "DoubleStorage",
    np.dtype("float32"): "FloatStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage",
    np.dtype("int16"): "ShortStorage",
    np.dtype("int8"): "CharStorage",
    np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}
_UNTYPED_DTYPES = {
    np.dtype("uint16"): "uint16",
    np.dtype("uint32"): "uint32",
    np.dtype("uint64"): "uint64",
}


class Global:
    """A reference to `module.name`, pickled as GLOBAL (the module need not exist here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle checks that a REDUCE callable is callable; never called
        raise AssertionError("a Global is only written, never called")


class Reduce:
    """`func(*args)` in the file (GLOBAL, args, REDUCE), then BUILD with `state` if given."""

    def __init__(self, func: Global, args: tuple, state: Any = None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


class Storage:
    """A flat buffer that several `TensorView`s may share (one torch storage)."""

    def __init__(self, values: np.ndarray):
        self.flat = np.array(values).ravel()


class TensorView:
    """A tensor over `storage`: element `offset`, `shape` and element `stride` as torch has them."""

    def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = (
            storage,
            offset,
            tuple(shape),
            tuple(stride),
        )


def _rebuild_args(view: TensorView) -> tuple[Global, tuple]:
    dtype = view.storage.flat.dtype
    common = (view.storage, view.offset, view.shape, view.stride, False, collections.OrderedDict())
    if dtype in _UNTYPED_DTYPES:
        return Global("torch._utils", "_rebuild_tensor_v3"), common + (
            Global("torch", _UNTYPED_DTYPES[dtype]),
        )
    if dtype not in _STORAGE_CLASSES:
        raise TypeError(f"write_torch_file cannot write {dtype} tensors")
    return Global("torch._utils", "_rebuild_tensor_v2"), common


class _TorchPickler(pickle._Pickler):
    """The pure-Python pickler, with torch's persistent ids for storages and tensors as reduces."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, *, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy
        self.storages: dict[int, tuple[str, Storage]] = {}  # id -> (key, storage), first-use order

    def _save_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = _save_global

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            array = np.array(obj, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
            stride = tuple(s // array.itemsize for s in array.strides)
            obj = TensorView(Storage(array), 0, array.shape, stride)
        if isinstance(obj, TensorView):
            return _rebuild_args(obj)
        return NotImplemented

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        key, _ = self.storages.setdefault(id(obj), (str(len(self.storages)), obj))
        dtype = obj.flat.dtype
        if dtype in _UNTYPED_DTYPES:
            kind, numel = Global("torch.storage", "UntypedStorage"), obj.flat.nbytes
        else:
            kind, numel = Global("torch", _STORAGE_CLASSES[dtype]), obj.flat.size
        pid = ("storage", kind, key, "cpu", numel)
        return pid + (None,) if self.legacy else pid


def _storage_bytes(storage: Storage, big_endian: bool) -> bytes:
    flat = storage.flat
    if not big_endian or flat.itemsize == 1:
        return flat.tobytes()
    return flat.view(np.uint8).reshape(-1, flat.itemsize)[:, ::-1].tobytes()


def write_torch_file(path, obj: Any, *, legacy: bool = False, big_endian: bool = False) -> None:
    """Write `obj` to `path` as `torch.save(obj, path)` would (see the module docstring).

    **Arguments:**

    - `legacy`: the pre-1.6 format (`_use_new_zipfile_serialization=False`): five pickles, then
        each storage as `(int64 numel, bytes)`; else the zip format (`archive/data.pkl`,
        `archive/data/<key>`, `archive/byteorder`, `archive/version`), members stored.
    - `big_endian`: storages (and legacy numel records) in big-endian byte order, as a
        big-endian machine writes them.
    """
    buffer = io.BytesIO()
    pickler = _TorchPickler(buffer, legacy=legacy)
    pickler.dump(obj)
    storages = dict(pickler.storages.values())
    if legacy:
        sys_info = {
            "protocol_version": LEGACY_PROTOCOL,
            "little_endian": not big_endian,
            "type_sizes": {"short": 2, "int": 4, "long": 8},
        }
        with open(path, "wb") as file:
            for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, sys_info):
                pickle.dump(header, file, protocol=2)
            file.write(buffer.getvalue())
            keys = sorted(storages, key=int)
            pickle.dump(keys, file, protocol=2)
            for key in keys:
                flat = storages[key].flat
                numel = flat.nbytes if flat.dtype in _UNTYPED_DTYPES else flat.size
                file.write(struct.pack(">q" if big_endian else "<q", numel))
                file.write(_storage_bytes(storages[key], big_endian))
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", buffer.getvalue())
            archive.writestr("archive/byteorder", "big" if big_endian else "little")
            for key, storage in storages.items():
                archive.writestr(f"archive/data/{key}", _storage_bytes(storage, big_endian))
            archive.writestr("archive/version", "3\n")


def storage_member(path, key: str) -> tuple[int, int]:
    """(file offset, size) of the bytes of storage `key` in a zip-format file (to corrupt them)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"archive/data/{key}")
    with open(path, "rb") as file:
        file.seek(info.header_offset + 26)
        name_size, extra_size = struct.unpack("<HH", file.read(4))
    return info.header_offset + 30 + name_size + extra_size, info.file_size


__all__ = [
    "Global",
    "Reduce",
    "Storage",
    "TensorView",
    "storage_member",
    "write_torch_file",
]
