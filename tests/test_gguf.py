"""GGUF (llama.cpp's format): reading with gguf's own dequantisation, writing files gguf
reads back, lossless round trips, quantised conversions that need ``--dtype``, verify's
quantisation-error table against Hugging Face names, and hostile headers refused fast."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli
from safetensors import safe_open
from safetensors.torch import save_file

from nnconv.converter import load, save
from nnconv.converter.quantization import DEQUANTIZED_KEY, PERMUTED, unpermute
from nnconv.formats import FormatError, NnconvError, UnsupportedError, registry, to_object
from nnconv.formats.gguf import gguf_format, gguf_header
from nnconv.formats.gguf.gguf_format import QUANT_KEY, TYPES_KEY

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
RNG = np.random.default_rng(0)

# --- helpers ---------------------------------------------------------------------


def q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks of ``x`` (rows of a multiple of 256): gguf-py has Q4_K's dequantisation
    but not its quantisation, so this is the block layout ggml's dequantize_row_q4_K reads
    (d, dmin, 6-bit scales and mins packed in 12 bytes, 4-bit values), scales by min/max."""
    blocks = x.astype(np.float32).reshape(-1, 8, 32)
    low, high = np.minimum(blocks.min(-1), 0), blocks.max(-1)
    scale, offset = (high - low) / 15, -low
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (offset.max(-1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, where=d32 > 0, out=np.zeros_like(scale))), 0, 63)
    mn = np.clip(
        np.round(np.divide(offset, dmin32, where=dmin32 > 0, out=np.zeros_like(scale))), 0, 63
    )
    step, base = (d32 * sc)[..., None], (dmin32 * mn)[..., None]
    q = np.clip(
        np.round(np.divide(blocks + base, step, where=step > 0, out=np.zeros_like(blocks))), 0, 15
    )
    sc, mn, q = sc.astype(np.uint8), mn.astype(np.uint8), q.astype(np.uint8)
    scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4),
        ],
        axis=1,
    )
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    out = np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], 1
    )
    return out.reshape(*x.shape[:-1], x.shape[-1] // 256 * 144)


def quantize(x: np.ndarray, kind) -> np.ndarray:
    """gguf's own quantisation, and :func:`q4_k` for Q4_K (which gguf-py cannot quantise)."""
    try:
        return gguf.quants.quantize(x, kind)
    except NotImplementedError:
        assert kind == T.Q4_K
        return q4_k(x)


def write_gguf(path: Path, tensors: dict, *, arch: str = "llama", kv=None) -> Path:
    """A GGUF file by gguf's writer: {name: (array, GGML type)}."""
    writer = gguf.GGUFWriter(path, arch)
    for key, (value, *kind) in (kv or {}).items():
        writer.add_key_value(key, value, *kind)
    for name, (array, kind) in tensors.items():
        if kind in (T.F32, T.F16):
            writer.add_tensor(name, array.astype(np.float32 if kind == T.F32 else np.float16))
        else:
            writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 64


def llama_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Llama-shaped state_dict with Hugging Face names (GQA: 4 heads, 2 KV heads)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    kv = HIDDEN // HEADS * KV_HEADS
    sd = {"model.embed_tokens.weight": w(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": w(kv, HIDDEN),
            p + "self_attn.v_proj.weight": w(kv, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": w(INTER, HIDDEN),
            p + "mlp.up_proj.weight": w(INTER, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, INTER),
            p + "input_layernorm.weight": 1 + w(HIDDEN),
            p + "post_attention_layernorm.weight": 1 + w(HIDDEN),
        }
    sd |= {"model.norm.weight": 1 + w(HIDDEN), "lm_head.weight": w(VOCAB, HIDDEN)}
    return sd


def permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama_gguf(path: Path, sd: dict[str, torch.Tensor], kind, *, swap: bool = False) -> Path:
    """What convert_hf_to_gguf + llama-quantize make: llama.cpp names, Q/K permuted,
    matrices quantised to ``kind``, norms F32.  ``swap``: gate and up exchanged."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    tensors = {}
    for name, t in sd.items():
        data = t.numpy()
        if name.endswith("q_proj.weight"):
            data = permute(data, HEADS, HEADS)
        if name.endswith("k_proj.weight"):
            data = permute(data, HEADS, KV_HEADS)
        if swap and "gate_proj" in name:
            data = sd[name.replace("gate_proj", "up_proj")].numpy()
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        tensors[new] = (data, T.F32 if data.ndim == 1 else kind)
    u32 = gguf.GGUFValueType.UINT32
    kv = {
        "llama.block_count": (LAYERS, u32),
        "llama.attention.head_count": (HEADS, u32),
        "llama.attention.head_count_kv": (KV_HEADS, u32),
        "llama.embedding_length": (HIDDEN, u32),
    }
    return write_gguf(path, tensors, kv=kv)


# --- reading -------------------------------------------------------------------------


def test_reads_f32_f16_q8_0_q4_k_as_gguf_dequantises_them(tmp_path):
    x = {k: RNG.standard_normal((4, 512)).astype(np.float32) for k in ("a", "b", "c", "d")}
    kinds = {"a": T.F32, "b": T.F16, "c": T.Q8_0, "d": T.Q4_K}
    kv = {"note": ("hello", gguf.GGUFValueType.STRING), "eps": (1e-5, gguf.GGUFValueType.FLOAT32)}
    path = write_gguf(tmp_path / "m.gguf", {k: (x[k], kinds[k]) for k in x}, kv=kv)
    reader = gguf.GGUFReader(path)
    with load(path) as ckpt:
        assert ckpt.format == "gguf" and list(ckpt.tensors) == ["a", "b", "c", "d"]
        for t in reader.tensors:
            lazy = ckpt.tensors[t.name]
            expected = gguf.quants.dequantize(t.data, t.tensor_type)  # gguf's own values
            got = lazy.load()
            assert tuple(got.shape) == lazy.shape == (4, 512)
            if t.tensor_type == T.F16:
                assert lazy.dtype == "float16" and lazy.span is not None
                assert np.array_equal(got.numpy().view(np.uint16), t.data.view(np.uint16))
            else:
                assert lazy.dtype == "float32"
                assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))
        assert ckpt.tensors["a"].span is not None and ckpt.tensors["c"].span is None
        assert json.loads(ckpt.metadata[QUANT_KEY]) == {"c": "Q8_0", "d": "Q4_K"}
        assert ckpt.metadata["note"] == "hello" and ckpt.metadata["general.architecture"] == "llama"
        assert json.loads(ckpt.metadata["eps"]) == float(np.float32(1e-5))
        assert json.loads(ckpt.metadata[TYPES_KEY]) == {"eps": "FLOAT32"}
    q8, q4 = (ckpt.tensors[n].load().numpy() for n in "cd")
    err = {
        n: np.sqrt(((v - x[n]) ** 2).mean() / (x[n] ** 2).mean()) for n, v in (("c", q8), ("d", q4))
    }
    assert err["c"] < 0.01 < err["d"] < 0.15  # the Q4_K helper is a sane quantiser


def test_inspect_shows_key_values_and_each_tensors_quantisation(tmp_path, capfd):
    x = RNG.standard_normal((2, 256)).astype(np.float32)
    path = write_gguf(tmp_path / "m.gguf", {"w": (x, T.Q4_K), "n": (x[0], T.F32)})
    run = cli(capfd, "inspect", path)
    assert run.rc == 0, run.err
    assert "general.architecture: llama" in run.out
    assert "nnconv.quantization: (dequantised when read from 1 Q4_K)" in run.out
    assert "float32 (Q4_K)" in run.out
    data = json.loads(cli(capfd, "inspect", path, "--json").out)
    assert json.loads(data["metadata"][QUANT_KEY]) == {"w": "Q4_K"}


def test_header_parser_reads_what_gguf_reader_reads(tmp_path):
    """nnconv's bounded parser against llama.cpp's reader, field by field."""
    kinds = gguf.GGUFValueType
    kv = {f"s.{k.name}": (1, k) for k in kinds if k not in (kinds.STRING, kinds.ARRAY)}
    kv |= {"f": (0.1, kinds.FLOAT32), "d": (-2.5e300, kinds.FLOAT64), "t": ("ß\x00", kinds.STRING)}
    kv |= {"a.str": (["", "é", "<0x0A>"], kinds.ARRAY, kinds.STRING)}
    kv |= {f"a.{k.name}": ([0, 1, 1], kinds.ARRAY, k) for k in (kinds.INT8, kinds.UINT64)}
    kv |= {"a.f": ([1.5, float("inf")], kinds.ARRAY, kinds.FLOAT32), "b": (True, kinds.BOOL)}
    x = RNG.standard_normal((2, 3, 256)).astype(np.float32)
    files = [
        write_gguf(tmp_path / "kv.gguf", {"q": (x, T.Q4_K), "f": (x[0], T.F16)}, kv=kv),
        *sorted((Path(__file__).parent / "fuzz" / "seeds" / "gguf").glob("*.gguf")),
    ]
    sizes = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    for path in files:
        reader = gguf.GGUFReader(path)
        header = gguf_header.parse(path, path.read_bytes(), sizes)
        fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert list(header.values) == list(fields), path
        for key, (spec, value) in header.values.items():
            names = [t.name for t in fields[key].types]
            assert spec == (f"ARRAY[{names[1]}]" if len(names) > 1 else names[0]), key
            assert value == fields[key].contents(), key
        assert [(t.name, t.ggml_type, t.dims, t.offset, t.nbytes) for t in header.tensors] == [
            (t.name, int(t.tensor_type), tuple(t.shape.tolist()), t.data_offset, t.n_bytes)
            for t in reader.tensors
        ]


# --- writing -------------------------------------------------------------------------


def test_llama_state_dict_written_by_nnconv_reads_in_gguf(tmp_path):
    sd = llama_state_dict()
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.bfloat16)
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"].half()
    save(sd, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert [t.name for t in reader.tensors] == list(sd)
    kinds = {"float32": T.F32, "float16": T.F16, "bfloat16": T.BF16}
    for t in reader.tensors:
        ours = sd[t.name]
        assert t.tensor_type == kinds[str(ours.dtype).removeprefix("torch.")]
        assert list(reversed(t.shape.tolist())) == list(ours.shape)  # GGUF lists dims reversed
        assert t.data.tobytes() == ours.contiguous().view(torch.uint8).numpy().tobytes()
    assert reader.fields["nnconv.version"].contents() == "1"


def test_unquantised_round_trip_through_gguf_is_bit_identical(tmp_path, capfd):
    sd = llama_state_dict()
    sd["lm_head.weight"] = sd["lm_head.weight"].to(torch.bfloat16)
    sd["model.norm.weight"] = sd["model.norm.weight"].half()
    sd["steps"] = torch.tensor([3, -1], dtype=torch.int64)
    save_file(sd, tmp_path / "a.safetensors", metadata={"format": "pt", "note": "x"})
    for args in (("a.safetensors", "m.gguf"), ("m.gguf", "b.safetensors")):
        run = cli(capfd, "convert", *(tmp_path / a for a in args))
        assert run.rc == 0, run.err
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        order = list(f.keys())  # safetensors' writer orders by dtype and size
    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        assert list(f.keys()) == order and f.metadata()["note"] == "x"
        for name, t in sd.items():
            assert f.get_tensor(name).dtype == t.dtype
            assert torch.equal(f.get_tensor(name).view(torch.uint8), t.view(torch.uint8))
    assert cli(capfd, "verify", tmp_path / "a.safetensors", tmp_path / "m.gguf").rc == 0


def test_what_gguf_lacks_is_stored_as_bytes_and_comes_back(tmp_path):
    obj = {
        "mask": torch.tensor([True, False]),
        "u": torch.arange(6, dtype=torch.int32).reshape(2, 3).to(torch.uint16),
        "c": torch.tensor([1 + 2j], dtype=torch.complex128),
        "s": torch.tensor(2.5),
        "five": torch.arange(32.0).reshape(2, 2, 2, 2, 2),
        "nested": [torch.zeros(0, 3), {"k": 1}],
    }
    obj["tied"] = obj["u"]
    save(obj, tmp_path / "m.gguf")
    back = to_object(load(tmp_path / "m.gguf"))
    assert back.keys() == obj.keys() and back["nested"][1] == {"k": 1}
    for key in ("mask", "u", "c", "s", "five"):
        assert back[key].dtype == obj[key].dtype and torch.equal(back[key], obj[key])
    assert back["tied"].data_ptr() == back["u"].data_ptr()
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.name: t.tensor_type.name for t in reader.tensors}["mask"] == "I8"


def test_key_value_types_survive_a_trip_through_safetensors(tmp_path, capfd):
    kinds = gguf.GGUFValueType
    u32, f32, array = kinds.UINT32, kinds.FLOAT32, kinds.ARRAY
    kv = {
        "llama.block_count": (2, u32),
        "eps": (1e-6, f32),
        "tokens": (["<s>", "é", ""], array, kinds.STRING),
        "scores": ([0.5, -1.0], array, f32),
    }
    write_gguf(tmp_path / "a.gguf", {"w": (np.ones((2, 4), np.float32), T.F32)}, kv=kv)
    save(load(tmp_path / "a.gguf"), tmp_path / "m.safetensors")
    save(load(tmp_path / "m.safetensors"), tmp_path / "b.gguf")
    fields = gguf.GGUFReader(tmp_path / "b.gguf").fields
    assert (
        fields["llama.block_count"].types == [u32] and fields["llama.block_count"].contents() == 2
    )
    assert fields["eps"].types == [f32] and fields["eps"].contents() == np.float32(1e-6)
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokens"].types == [array, kinds.STRING]
    assert fields["tokens"].contents() == ["<s>", "é", ""]
    assert fields["scores"].types == [array, f32] and fields["scores"].contents() == [0.5, -1.0]


# --- quantised conversions -------------------------------------------------------------


def test_converting_quantised_tensors_needs_dtype(tmp_path, capfd):
    x = RNG.standard_normal((2, 256)).astype(np.float32)
    path = write_gguf(tmp_path / "q.gguf", {"w": (x, T.Q8_0), "n": (x[0], T.F32)})
    run = cli(capfd, "convert", path, tmp_path / "o.safetensors")
    assert run.rc == 2 and "1 tensor is stored quantised (1 Q8_0)" in run.err
    assert "--dtype float32" in run.err and not (tmp_path / "o.safetensors").exists()
    run = cli(capfd, "convert", path, tmp_path / "o.safetensors", "--dtype", "float32")
    assert run.rc == 0, run.err
    with load(tmp_path / "o.safetensors") as ckpt:
        expected = gguf.quants.dequantize(quantize(x, T.Q8_0), T.Q8_0)
        assert np.array_equal(ckpt.tensors["w"].load().numpy(), expected)
        assert json.loads(ckpt.metadata[DEQUANTIZED_KEY]) == {"w": "Q8_0"}
        assert QUANT_KEY not in ckpt.metadata
    run = cli(capfd, "convert", tmp_path / "o.safetensors", tmp_path / "again.gguf")
    assert run.rc == 0, run.err  # plain float32 now: no --dtype needed


# --- verify: the quantisation-error table ----------------------------------------------


def _verify(capfd, ref: Path, cand: Path):
    """(exit status, the candidate's JSON report, the text report)."""
    report = cand.with_suffix(".json")
    run = cli(capfd, "verify", ref, cand, "--json", report)
    assert run.rc in (0, 1), run.err
    return run.rc, json.loads(report.read_text())["candidates"][0], run.out


def test_verify_reports_quantisation_error_q4_k_worse_than_q8_0(tmp_path, capfd):
    sd = llama_state_dict()
    save_file(sd, tmp_path / "model.safetensors")
    rows = {}
    for kind in (T.Q8_0, T.Q4_K):
        llama_gguf(tmp_path / f"model-{kind.name}.gguf", sd, kind)
        rc, cand, text = _verify(
            capfd, tmp_path / "model.safetensors", tmp_path / f"model-{kind.name}.gguf"
        )
        assert rc == 0 and cand["passed"], cand
        rows[kind.name] = {r["name"]: r for r in cand["quantization"]}
        assert set(rows[kind.name]) == set(sd)
        assert any("compared by error" in n for n in cand["notes"])
    q8, q4 = rows["Q8_0"], rows["Q4_K"]
    for name, row in q4.items():
        if row["quant_type"] == "float32":  # norms: stored unquantised, as they are
            assert row["max_abs"] == 0 and q8[name]["cosine"] == 1
            continue
        assert row["quant_type"] == "Q4_K" and q8[name]["quant_type"] == "Q8_0"
        assert q8[name]["rel_rms"] < 0.01 < row["rel_rms"] < 0.15
        assert row["cosine"] < q8[name]["cosine"] and row["cosine"] > 0.99
        permuted = name.endswith(("q_proj.weight", "k_proj.weight"))
        assert row["layout"] == (PERMUTED if permuted else "as stored")
    assert q4["model.layers.1.self_attn.k_proj.weight"]["candidate_name"] == "blk.1.attn_k.weight"
    assert "quantisation error" in text and "Q4_K: 16 tensors" in text  # the last: Q4_K's
    assert "blk.0.attn_q.weight" in text and "unpermuted" in text


def test_verify_fails_a_quantised_file_of_other_values_or_names(tmp_path, capfd):
    sd = llama_state_dict()
    save_file(sd, tmp_path / "model.safetensors")
    llama_gguf(tmp_path / "swapped.gguf", sd, T.Q8_0, swap=True)
    rc, cand, _ = _verify(capfd, tmp_path / "model.safetensors", tmp_path / "swapped.gguf")
    failed = {r["name"] for r in cand["quantization"] if not r["passed"]}
    assert rc == 1 and failed == {f"model.layers.{i}.mlp.gate_proj.weight" for i in range(LAYERS)}
    del sd["model.norm.weight"]  # the reference lacks a tensor the GGUF file has
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(32)  # llama.cpp drops it
    save_file(sd, tmp_path / "fewer.safetensors")
    llama_gguf(tmp_path / "ok.gguf", llama_state_dict(), T.Q8_0)
    rc, cand, _ = _verify(capfd, tmp_path / "fewer.safetensors", tmp_path / "ok.gguf")
    bad = [p for p in cand["parameters"] if not p["passed"]]
    assert rc == 1 and [(p["status"], p["candidate_name"]) for p in bad] == [
        ("unexpected", "output_norm.weight")
    ]
    (buffer,) = [p for p in cand["parameters"] if p["name"].endswith("inv_freq")]
    assert buffer["status"] == "not a parameter" and buffer["passed"]


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(128, 8)
    assert torch.equal(unpermute(torch.from_numpy(permute(w.numpy(), 4, 2)), 2), w)


# --- hostile files -------------------------------------------------------------------


def _kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v


def _info(name: str, dims, kind: int, offset: int) -> bytes:
    n = name.encode()
    out = struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims))
    return out + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, offset)


def _file(infos=(), kvs=(), *, data=b"\0" * 64, counts=None, version=3) -> bytes:
    n_t, n_kv = counts or (len(infos), len(kvs))
    head = b"GGUF" + struct.pack("<IQQ", version, n_t, n_kv) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


HOSTILE = {
    "tensor count 2^60": _file(counts=(1 << 60, 0)),
    "key/value count 2^60": _file(counts=(0, 1 << 60)),
    "huge dims": _file([_info("w", [1 << 40, 1 << 40], 0, 0)]),
    "dims fitting int64, not the file": _file([_info("w", [1 << 31, 1 << 30], 0, 0)]),
    "offset past the end": _file([_info("w", [4], 0, 1 << 50)]),
    "data past the end": _file([_info("w", [64], 0, 0)]),
    "unknown type": _file([_info("w", [4], 99, 0)]),
    "five dimensions": _file([_info("w", [1, 1, 1, 1, 1], 0, 0)]),
    "partial quant block": _file([_info("w", [16], int(T.Q8_0), 0)]),
    "overlap": _file([_info("a", [8], 0, 0), _info("b", [8], 0, 16)]),
    "duplicate name": _file([_info("a", [4], 0, 0), _info("a", [4], 0, 32)]),
    "string length 2^62": _file(kvs=[struct.pack("<Q", 1 << 62) + b"k"]),
    "array of 2^40 items": _file(
        kvs=[struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 0, 1 << 40)]
    ),
    "nested array": _file(kvs=[struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 9, 1)]),
    "unknown value type": _file(kvs=[struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77)]),
    "alignment 3": _file(
        kvs=[struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 3)]
    ),
    "duplicate key": _file(kvs=[_kv_string("k", "a"), _kv_string("k", "b")]),
    "reserved key": _file(kvs=[_kv_string("GGUF.version", "a")]),
    "version 1": _file(version=1),
    "big-endian": b"GGUF" + struct.pack(">IQQ", 3, 0, 0) + b"\0" * 64,
    "split part": _file(kvs=[struct.pack("<Q", 11) + b"split.count" + struct.pack("<IH", 2, 3)]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_headers_are_refused_fast(tmp_path, case):
    path = tmp_path / "x.gguf"
    path.write_bytes(HOSTILE[case])
    assert registry.detect(path) is gguf_format
    start = time.perf_counter()
    with pytest.raises(NnconvError) as info:
        load(path)
    assert time.perf_counter() - start < 1.0
    assert isinstance(info.value, (FormatError, UnsupportedError)), info.value


def test_truncated_files_are_refused_at_every_length(tmp_path):
    x = RNG.standard_normal((2, 256)).astype(np.float32)
    full = write_gguf(tmp_path / "m.gguf", {"w": (x, T.Q8_0), "n": (x[0], T.F32)}).read_bytes()
    cut = tmp_path / "cut.gguf"
    for end in [*range(0, 400, 7), len(full) - 1]:
        cut.write_bytes(full[:end])
        with pytest.raises(NnconvError):
            load(cut)


def test_too_many_array_items_are_refused(tmp_path):
    n = gguf_header.MAX_ARRAY_ITEMS + 1
    kv = struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 0, n) + b"\0" * n
    (tmp_path / "x.gguf").write_bytes(_file(kvs=[kv]))
    start = time.perf_counter()
    with pytest.raises(FormatError, match="more than 4,194,304 items"):
        load(tmp_path / "x.gguf")
    assert time.perf_counter() - start < 1.0


def test_a_hostile_file_is_one_error_line(tmp_path, capfd):
    (tmp_path / "x.gguf").write_bytes(HOSTILE["tensor count 2^60"])
    run = cli(capfd, "inspect", tmp_path / "x.gguf")
    assert (
        run.rc == 2 and run.err.count("\n") == 1 and "claims 1,152,921,504,606,846,976" in run.err
    )


# --- without the gguf package ------------------------------------------------------------


def test_without_gguf_files_are_detected_and_refused_in_one_line(tmp_path, capfd, monkeypatch):
    x = np.ones((2, 4), np.float32)
    path = write_gguf(tmp_path / "m.gguf", {"w": (x, T.F32)})
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    assert registry.detect(path) is gguf_format
    with pytest.raises(UnsupportedError, match=r"pip install 'nnconv\[gguf\]'"):
        load(path)
    run = cli(capfd, "convert", tmp_path / "m.gguf", tmp_path / "o.safetensors")
    assert run.rc == 2 and "pip install 'nnconv[gguf]'" in run.err and run.err.count("\n") == 1
    with pytest.raises(UnsupportedError, match="nnconv"):
        save({"w": torch.ones(2)}, tmp_path / "new.gguf")
