"""Tests of eqdisp.io: torch-free, lazy, inert readers of .pth/.pt/.bin (zip and legacy),
.safetensors and .npz weight files, and its atomic writer. PyTorch files are written without
torch by `torchfiles`."""

import argparse
import collections
import os
import zipfile

import ml_dtypes
import numpy as np
import pytest
from torchfiles import Global, Reduce, Storage, TensorView, storage_member, write_torch_file

FORMATS = [
    pytest.param({"legacy": False}, id="zip"),
    pytest.param({"legacy": True}, id="legacy"),
    pytest.param({"legacy": False, "big_endian": True}, id="zip-big-endian"),
    pytest.param({"legacy": True, "big_endian": True}, id="legacy-big-endian"),
]

_CALLS: list = []


def _tripwire(*args):
    """Importable as test_io._tripwire: a reader that resolved globals would call it."""
    _CALLS.append(args)


def _assert_one_line(error, path):
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message


def _flat_tensors(rng):
    """Tensors of every kind the writer makes, and the arrays they should read back as."""
    base = Storage(rng.standard_normal(30).astype(np.float32))
    weight = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    bf16 = np.array([1.5, -2.0, 3.140625, 1e-30, -0.0], ml_dtypes.bfloat16)
    param = rng.standard_normal((2, 2)).astype(np.float32)
    with_attrs = rng.standard_normal(3).astype(np.float32)
    tensors = collections.OrderedDict(
        [
            ("a.conv.weight", weight),
            ("a.bn.num_batches_tracked", np.array(12, np.int64)),
            ("transposed", TensorView(base, 0, (5, 6), (1, 5))),  # a (6, 5) tensor's .t()
            ("offset_view", TensorView(base, 7, (2, 3), (5, 1))),  # base.reshape(6, 5)[1:3, 2:5]
            ("half", np.arange(4, dtype=np.float16) - 1.5),
            ("double", rng.standard_normal(3)),
            ("bf16", bf16),
            ("int8", np.array([-128, 0, 127], np.int8)),
            ("uint8", np.array([0, 255], np.uint8)),
            (
                "uint16",
                np.array([1, 65535], np.uint16),
            ),  # torch 2: UntypedStorage + _rebuild_tensor_v3
            ("mask", np.array([[True, False]])),
            ("empty", np.zeros((0, 3), np.float32)),
            (
                "param",
                Reduce(
                    Global("torch._utils", "_rebuild_parameter"),
                    (param, True, collections.OrderedDict()),
                ),
            ),
            (
                "with_attrs",  # a tensor with Python attributes: _rebuild_from_type_v2
                Reduce(
                    Global("torch._tensor", "_rebuild_from_type_v2"),
                    (
                        Global("torch._utils", "_rebuild_tensor_v2"),
                        Global("torch", "Tensor"),
                        (Storage(with_attrs), 0, (3,), (1,), False, collections.OrderedDict()),
                        {"note": "x"},
                    ),
                ),
            ),
            ("step", 1000),  # not a tensor: skipped by read_state_dict
        ]
    )
    expected = {
        "a.conv.weight": weight,
        "a.bn.num_batches_tracked": np.array(12, np.int64),
        "transposed": base.flat.reshape(6, 5).T,
        "offset_view": base.flat.reshape(6, 5)[1:3, 2:5],
        "half": tensors["half"],
        "double": tensors["double"],
        "bf16": bf16.astype(np.float32),
        "int8": tensors["int8"],
        "uint8": tensors["uint8"],
        "uint16": tensors["uint16"],
        "mask": tensors["mask"],
        "empty": tensors["empty"],
        "param": param,
        "with_attrs": with_attrs,
    }
    return tensors, expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_flat_round_trip_strides_offsets_dtypes(tmp_path, fmt):
    from eqdisp.io import TorchTensor, read_state_dict, read_torch, state_dict_entries

    tensors, expected = _flat_tensors(np.random.default_rng(0))
    path = tmp_path / "weights.bin"  # any suffix
    write_torch_file(path, tensors, **fmt)
    state = read_state_dict(path)
    assert list(state) == list(expected)  # file order; the int entry skipped
    for key, want in expected.items():
        assert state[key].dtype == want.dtype and state[key].dtype.isnative, key
        assert state[key].shape == want.shape, key
        np.testing.assert_array_equal(state[key], want, err_msg=key)
        assert state[key].flags.c_contiguous and state[key].flags.writeable, key
    assert state_dict_entries(path) == []
    lazy = read_torch(path)
    assert isinstance(lazy, collections.OrderedDict) and lazy["step"] == 1000
    tensor = lazy["transposed"]
    assert isinstance(tensor, TorchTensor) and tensor.shape == (5, 6) and tensor.dtype == np.float32
    assert lazy["bf16"].dtype == np.float32 and lazy["uint16"].dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(tensor), expected["transposed"])
    assert np.asarray(lazy["half"], dtype=np.float32).dtype == np.float32


def _adamw_state(rng, params):
    state = {
        i: {
            "step": np.array(7.0, np.float32),
            "exp_avg": rng.standard_normal(p.shape).astype(np.float32),
            "exp_avg_sq": rng.random(p.shape).astype(np.float32),
        }
        for i, p in enumerate(params)
    }
    group = {
        "lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
        "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
        "fused": None, "params": list(range(len(params))),
    }  # fmt: skip
    return {"state": state, "param_groups": [group]}


def _training_checkpoint(rng):
    """A SiT / DiT / REPA train.py checkpoint in miniature."""
    model = collections.OrderedDict(
        [
            ("x_embedder.proj.weight", rng.standard_normal((8, 4, 2, 2)).astype(np.float32)),
            ("blocks.0.attn.qkv.bias", rng.standard_normal(24).astype(np.float32)),
            ("y_embedder.embedding_table.weight", rng.standard_normal((11, 8)).astype(np.float32)),
        ]
    )
    ema = collections.OrderedDict((k, (v * 0.5).astype(np.float32)) for k, v in model.items())
    args = argparse.Namespace(
        model="SiT-XL/2", image_size=256, num_classes=1000, lr=1e-4, ckpt=None, use_ema=True,
        proj_coeff=0.5, encoder_depth=8, data_path="/data/imagenet", epochs=1400,
    )  # fmt: skip
    checkpoint = {
        "model": model,
        "ema": ema,
        "opt": _adamw_state(rng, list(model.values())),
        "args": args,
        "steps": 400000,
        "notes": ["a", 1, 2.5, None, True, (1, 2)],
    }
    return checkpoint


@pytest.mark.parametrize("fmt", FORMATS[:2])
def test_training_checkpoint_reads_as_data(tmp_path, fmt):
    from eqdisp.io import (
        Opaque,
        TorchTensor,
        describe,
        read_state_dict,
        read_torch,
        state_dict_entries,
    )

    checkpoint = _training_checkpoint(np.random.default_rng(1))
    path = tmp_path / "0400000.pt"
    write_torch_file(path, checkpoint, **fmt)
    obj = read_torch(path)
    assert list(obj) == ["model", "ema", "opt", "args", "steps", "notes"]
    assert obj["steps"] == 400000 and obj["notes"] == ["a", 1, 2.5, None, True, (1, 2)]
    args = obj["args"]
    assert isinstance(args, Opaque) and args.qualname == "argparse.Namespace" and args.args == ()
    assert args.attributes == vars(checkpoint["args"]) and args.state == vars(checkpoint["args"])
    assert args.get("model") == "SiT-XL/2" and args.model == "SiT-XL/2" and args.ckpt is None
    assert args.get("missing", "default") == "default"
    with pytest.raises(AttributeError, match="missing"):
        _ = args.missing
    opt = obj["opt"]
    assert opt["param_groups"] == checkpoint["opt"]["param_groups"]
    for i, moments in checkpoint["opt"]["state"].items():
        assert set(opt["state"][i]) == set(moments)
        for name, want in moments.items():
            assert isinstance(opt["state"][i][name], TorchTensor)
            np.testing.assert_array_equal(opt["state"][i][name].numpy(), want)
    for entry in ("model", "ema"):
        state = read_state_dict(path, entry=entry)
        assert list(state) == list(checkpoint[entry])
        for key, want in checkpoint[entry].items():
            np.testing.assert_array_equal(state[key], want)
    assert state_dict_entries(path) == ["model", "ema"]
    assert describe(path) == {
        "model": "state dict of 3 tensors",
        "ema": "state dict of 3 tensors",
        "opt": "mapping of 2 entries",
        "args": "argparse.Namespace",
        "steps": "int 400000",
        "notes": "list of 6 items",
    }


def test_entry_selection_errors(tmp_path):
    from safetensors.numpy import save_file

    from eqdisp.io import WeightsError, read_state_dict

    path = tmp_path / "checkpoint.pt"
    write_torch_file(path, _training_checkpoint(np.random.default_rng(2)))
    with pytest.raises(
        WeightsError, match=r"state dicts 'model', 'ema'; choose one with entry="
    ) as info:
        read_state_dict(path)
    _assert_one_line(info, path)
    with pytest.raises(
        WeightsError, match=r"entry 'opt' .* is not a state dict .*'model', 'ema'"
    ) as info:
        read_state_dict(path, entry="opt")
    _assert_one_line(info, path)
    with pytest.raises(
        WeightsError, match=r"no entry 'state_dict'; its state dicts are 'model', 'ema'"
    ) as info:
        read_state_dict(path, entry="state_dict")
    _assert_one_line(info, path)
    flat = tmp_path / "flat.pth"
    write_torch_file(flat, {"w": np.ones(2, np.float32)})
    with pytest.raises(
        WeightsError, match="no entry 'ema'; it holds no nested state dicts"
    ) as info:
        read_state_dict(flat, entry="ema")
    _assert_one_line(info, flat)
    lightning = tmp_path / "last.ckpt"
    write_torch_file(lightning, {"epoch": 3, "state_dict": {"model.w": np.ones(2, np.float32)}})
    assert list(read_state_dict(lightning, entry="state_dict")) == ["model.w"]
    with pytest.raises(WeightsError, match="'state_dict'; choose one"):
        read_state_dict(lightning)
    st = tmp_path / "w.safetensors"
    save_file({"w": np.ones(2, np.float32)}, st)
    with pytest.raises(WeightsError, match="flat .safetensors file .* entry='ema'") as info:
        read_state_dict(st, entry="ema")
    _assert_one_line(info, st)
    listed = tmp_path / "list.pt"
    write_torch_file(listed, [np.ones(2, np.float32)])
    with pytest.raises(WeightsError, match="holds no state dict .*list of 1 items") as info:
        read_state_dict(listed)
    _assert_one_line(info, listed)


@pytest.mark.parametrize("fmt", FORMATS[:2])
def test_reading_one_entry_reads_no_other_storage(tmp_path, fmt):
    """The optimizer's storage is damaged on disk; the EMA weights still read, the damage shows
    only when the optimizer's tensor itself is read: unused storages are never read."""
    from eqdisp.io import WeightsError, read_state_dict, read_torch

    rng = np.random.default_rng(3)
    ema = {"w": rng.standard_normal((16, 16)).astype(np.float32)}
    moment = rng.standard_normal(4096).astype(np.float32)
    path = tmp_path / "checkpoint.pt"
    write_torch_file(path, {"ema": ema, "opt": {"state": {0: {"exp_avg": moment}}}}, **fmt)
    if fmt["legacy"]:  # storages follow the pickles in key order: the moment's is last; cut it
        size = path.stat().st_size
        with open(path, "r+b") as file:
            file.truncate(size - moment.nbytes // 2)
    else:  # overwrite the middle of the moment's archive member (its CRC-32 no longer matches)
        start, length = storage_member(path, "1")
        assert length == moment.nbytes
        with open(path, "r+b") as file:
            file.seek(start + length // 2)
            file.write(b"\xff" * 64)
    np.testing.assert_array_equal(read_state_dict(path, entry="ema")["w"], ema["w"])
    lazy = read_torch(path)["opt"]["state"][0]["exp_avg"]
    assert lazy.shape == moment.shape
    with pytest.raises(WeightsError, match="truncated" if fmt["legacy"] else "corrupt") as info:
        lazy.numpy()
    _assert_one_line(info, path)


@pytest.mark.parametrize("fmt", FORMATS[:2])
def test_no_code_from_the_file_runs(tmp_path, fmt):
    from eqdisp.io import Opaque, describe, read_state_dict, read_torch

    marker = tmp_path / "pwned"
    calls = {
        "system": Reduce(Global("os", "system"), (f"touch {marker}",)),
        "mkdir": Reduce(Global("posix", "mkdir"), (str(marker),)),
        "tripwire": Reduce(Global("test_io", "_tripwire"), ("called",), state={"k": 1}),
        "eval": Reduce(Global("builtins", "eval"), (f"open({str(marker)!r}, 'w')",)),
        "getattr": Reduce(Global("builtins", "getattr"), (Global("os", "path"), "exists")),
        "reference": Global("subprocess", "Popen"),
    }
    weights = {"w": np.arange(3, dtype=np.float32)}
    path = tmp_path / "evil.pt"
    write_torch_file(path, dict(weights, **calls), **fmt)
    obj = read_torch(path)
    np.testing.assert_array_equal(read_state_dict(path)["w"], weights["w"])  # the calls are skipped
    assert describe(path)["system"] == "os.system"
    assert describe(path)["reference"] == "reference to subprocess.Popen"
    assert not marker.exists() and _CALLS == []
    system = obj["system"]
    assert isinstance(system, Opaque) and system.qualname == "os.system"
    assert system.args == (f"touch {marker}",)
    assert obj["tripwire"].qualname == "test_io._tripwire" and obj["tripwire"].state == {"k": 1}
    assert obj["getattr"].args[0].qualname == "os.path"  # the reference, unresolved
    assert isinstance(obj["reference"], type) and issubclass(obj["reference"], Opaque)
    assert obj["reference"].qualname == "subprocess.Popen"


def test_file_cannot_modify_the_readers_objects(tmp_path):
    """pickle's BUILD sets attributes: on a tensor it could move its shape past its storage (a read
    outside the buffer), on the reader's functions it could set `__defaults__`. Both are refused."""
    import pickle

    from eqdisp.io import WeightsError, read_torch

    tensor = Reduce(
        Global("torch._utils", "_rebuild_tensor_v2"),
        (Storage(np.zeros(2, np.float32)), 0, (2,), (1,), False, collections.OrderedDict()),
        state={"shape": (1 << 20,)},
    )
    path = tmp_path / "grow.pt"
    write_torch_file(path, {"w": tensor})
    with pytest.raises(WeightsError, match="tries to modify the reader's TorchTensor") as info:
        read_torch(path)
    _assert_one_line(info, path)
    state = pickle.dumps((None, {"__defaults__": ("utf-16",)}), protocol=2)[2:-1]
    path = tmp_path / "defaults.pt"
    with zipfile.ZipFile(path, "w") as archive:  # GLOBAL _codecs.encode, BUILD (no call)
        archive.writestr("archive/data.pkl", b"\x80\x02c_codecs\nencode\n" + state + b"b.")
    with pytest.raises(WeightsError, match="tries to modify the reader's _Trusted"):
        read_torch(path)


def test_tensor_the_reader_cannot_decode_is_a_one_line_error(tmp_path):
    from eqdisp.io import Opaque, WeightsError, read_state_dict, read_torch

    quantized = Reduce(
        Global("torch._utils", "_rebuild_qtensor"), (Storage(np.zeros(2, np.int8)), 0, (2,), (1,))
    )
    path = tmp_path / "quantized.pth"
    write_torch_file(path, {"ok": np.ones(2, np.float32), "q": quantized})
    assert isinstance(read_torch(path)["q"], Opaque)
    with pytest.raises(
        WeightsError, match=r"tensor q is built by torch._utils._rebuild_qtensor"
    ) as info:
        read_state_dict(path)
    _assert_one_line(info, path)


def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path):
    """The u64 header length comes first; its low byte may be 0x80, a pickle's first byte."""
    from safetensors.numpy import save_file

    from eqdisp.io import read_state_dict

    for pad in range(300):  # key lengths that move the header length through one low byte
        path = tmp_path / f"{pad}.safetensors"
        save_file({"w" * (pad + 1): np.ones(2, np.float32)}, path)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length with low byte 0x80 found")
    np.testing.assert_array_equal(read_state_dict(path)["w" * (pad + 1)], np.ones(2, np.float32))


def test_safetensors_and_npz(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from eqdisp.io import describe, read_state_dict, state_dict_entries

    rng = np.random.default_rng(4)
    bf16 = rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16)
    tensors = {
        "decoder.conv_in.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "half": rng.standard_normal(5).astype(np.float16),
        "bf16": bf16,
        "count": np.array(3, np.int64),
    }
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(tensors, path)
    state = read_state_dict(path)
    with safe_open(path, framework="numpy") as file:
        assert list(state) == file.offset_keys()  # file (data offset) order
    assert set(state) == set(tensors)
    assert state["bf16"].dtype == np.float32
    np.testing.assert_array_equal(state["bf16"], bf16.astype(np.float32))  # exact widening
    for key in ("decoder.conv_in.weight", "half", "count"):
        assert state[key].dtype == tensors[key].dtype and state[key].shape == tensors[key].shape
        np.testing.assert_array_equal(state[key], tensors[key])
    assert describe(path)["bf16"] == "tensor float32 (3, 2)"
    assert state_dict_entries(path) == []

    npz = tmp_path / "weights.npz"
    arrays = {k: v for k, v in tensors.items() if k != "bf16"}
    np.savez(npz, **arrays)
    state = read_state_dict(npz)
    assert list(state) == list(arrays)
    for key, want in arrays.items():
        assert state[key].dtype == want.dtype
        np.testing.assert_array_equal(state[key], want)
    assert describe(npz)["decoder.conv_in.weight"] == "tensor float32 (4, 3, 3, 3)"
    renamed = tmp_path / "weights.pth"  # the format is told by content, not by suffix
    os.replace(npz, renamed)
    assert list(read_state_dict(renamed)) == list(arrays)


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    """A write that fails part way keeps the file as it was and leaves no temporary behind; a
    write that finishes replaces it whole. Every report, manifest, shard and ledger goes this way."""
    from eqdisp.io import atomic_path, write_text_atomically

    path = tmp_path / "report.json"
    write_text_atomically(path, "old ünïcode\n")
    assert path.read_text(encoding="utf-8") == "old ünïcode\n"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp.name.startswith(".") and str(os.getpid()) in tmp.name
            tmp.write_text("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text(encoding="utf-8") == "old ünïcode\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=np.arange(3))
    np.testing.assert_array_equal(np.load(path)["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_missing_unreadable_and_unknown_files_are_one_line_errors(tmp_path):
    from eqdisp.io import WeightsError, describe, read_state_dict, read_torch

    def check(path, pattern, reader=read_state_dict):
        with pytest.raises(WeightsError, match=pattern) as info:
            reader(path)
        _assert_one_line(info, path)

    check(tmp_path / "nowhere.pth", "does not exist")
    check(tmp_path / "nowhere.pth", "does not exist", read_torch)
    check(tmp_path / "nowhere.pth", "does not exist", describe)
    check(tmp_path, "is a directory")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    check(garbage, r"not a weight file: expected \.safetensors, \.npz, or a PyTorch file")
    check(garbage, "cannot read .* as a PyTorch file", read_torch)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    check(empty, "not a weight file")
    other_zip = tmp_path / "other.pth"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    check(other_zip, "not a weight file")
    check(other_zip, "not a PyTorch file", read_torch)
    npz = tmp_path / "a.npz"
    np.savez(npz, a=np.ones(2))
    check(npz, r"not a PyTorch file \(no <root>/data.pkl\)", read_torch)
    bad_pickle = tmp_path / "bad_pickle.pt"
    with zipfile.ZipFile(bad_pickle, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00(X\x01")
    check(bad_pickle, "cannot read .* as a PyTorch file")
    cut_legacy = tmp_path / "cut_legacy.pt"
    write_torch_file(cut_legacy, {"w": np.ones(3, np.float32)}, legacy=True)
    cut_legacy.write_bytes(cut_legacy.read_bytes()[:60])  # inside the pickles
    check(cut_legacy, "cannot read .* as a PyTorch file")
    not_torch_pickle = tmp_path / "plain.pkl"
    not_torch_pickle.write_bytes(b"\x80\x02K\x05.")  # pickle of the int 5
    check(not_torch_pickle, "not a PyTorch file")
    cut_st = tmp_path / "cut.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.ones(100, np.float32)}, cut_st)
    cut_st.write_bytes(cut_st.read_bytes()[:-40])
    check(cut_st, "cannot read .* as .safetensors")
    check(cut_st, "cannot read .* as .safetensors", describe)
    bad_npz = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad_npz, "w") as archive:
        archive.writestr("a.npy", b"not an array")
    check(bad_npz, "cannot read .* as .npz")


def test_matches_torch_load(tmp_path):
    """Cross-check against torch.save/torch.load where torch happens to be installed."""
    torch = pytest.importorskip("torch")
    from eqdisp.io import read_state_dict, read_torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    base = torch.randn(6, 5)
    extras = collections.OrderedDict(
        t=base.t(), v=base[1:3, 2:5], n=torch.tensor(3), bf=torch.randn(3).to(torch.bfloat16)
    )
    checkpoint = {
        "model": model.state_dict(),
        "ema": extras,
        "opt": opt.state_dict(),
        "args": argparse.Namespace(model="SiT-B/2", lr=1e-4),
    }
    for legacy in (False, True):
        path = tmp_path / f"torch_{legacy}.pt"
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
        for entry in ("model", "ema"):
            ours = read_state_dict(path, entry=entry)
            assert list(ours) == list(checkpoint[entry])
            for key, value in checkpoint[entry].items():
                np.testing.assert_array_equal(
                    ours[key],
                    value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy(),
                )
        obj = read_torch(path)
        assert obj["args"].attributes == vars(checkpoint["args"])
        assert obj["opt"]["param_groups"] == checkpoint["opt"]["param_groups"]
        for i, moments in checkpoint["opt"]["state"].items():
            for name, value in moments.items():
                np.testing.assert_array_equal(obj["opt"]["state"][i][name].numpy(), value.numpy())
