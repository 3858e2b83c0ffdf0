"""Red team: paths that leave the model's folder, inputs that are not files, and
``--force`` aimed at folders the user owns.

Every hostile layout is built here (symlinks, FIFOs, a character device) and
the real CLI runs in a child process (``redteam.nnconv``): a file outside the
model's folder is never read, copied or quoted, a FIFO or device is refused at
once instead of hanging, and ``--force`` never deletes a folder holding the
source or any file of the user's (an existing folder is written *into*).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nnconv.converter.convert import save
from nnconv.formats import paths
from nnconv.formats.errors import FormatError
from nnconv.formats.sharding import INDEX_NAME

sys.path.insert(0, str(Path(__file__).parent))
from redteam import WALL_LIMIT_S, nnconv, sha_tree  # noqa: E402

SENTINEL = b"SENTINEL-7f3a-do-not-leak"
SECRET_TEXT = b"AWS_SECRET=hunter2hunter2\npassword: swordfish\n"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _hf_folder(folder: Path) -> Path:
    """A two-shard Hugging Face folder (index + 2 shards), written with the safetensors library."""
    folder.mkdir(parents=True)
    save_file({"a.weight": torch.ones(4, 4)}, folder / SHARD1, metadata={"format": "pt"})
    save_file({"b.weight": torch.zeros(4)}, folder / SHARD2, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": 80},
        "weight_map": {"a.weight": SHARD1, "b.weight": SHARD2},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return folder


def _sentinel_shard(path: Path) -> Path:
    """A valid safetensors file holding b.weight whose metadata and bytes are the sentinel."""
    save_file({"b.weight": torch.zeros(4)}, path, metadata={"format": "pt", "s": SENTINEL.decode()})
    return path


def _assert_not_leaked(run, *secrets: bytes) -> None:
    text = run.stdout + run.stderr
    for secret in secrets:
        assert secret.decode() not in text, text
        assert secret[:8].decode(errors="replace") not in text, text
        (as_number,) = struct.unpack("<Q", secret[:8].ljust(8, b"\0"))
        assert str(as_number) not in text, text
        assert secret[:8].hex() not in text, text


# --- files beyond the one named: shards and the index ---------------------------


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_shard_symlinked_outside_the_folder_is_not_read(command, tmp_path):
    hf = _hf_folder(tmp_path / "hf")
    (tmp_path / "elsewhere").mkdir()
    outside = _sentinel_shard(tmp_path / "elsewhere" / "secret.safetensors")
    (hf / SHARD2).unlink()
    (hf / SHARD2).symlink_to(outside)
    argv = ["convert", "hf", "out.pt"] if command == "convert" else ["inspect", "hf", "--json"]
    run = nnconv(*argv, cwd=tmp_path)
    line = run.assert_refused("hf")
    assert "outside the model's folder" in line, line
    _assert_not_leaked(run, SENTINEL)
    assert not (tmp_path / "out.pt").exists()


def test_index_symlinked_outside_the_folder_is_not_read(tmp_path):
    hf = _hf_folder(tmp_path / "hf")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _sentinel_shard(outside / SHARD2)
    (outside / SHARD1).write_bytes((hf / SHARD1).read_bytes())
    (outside / INDEX_NAME).write_bytes((hf / INDEX_NAME).read_bytes())
    (hf / INDEX_NAME).unlink()
    (hf / INDEX_NAME).symlink_to(outside / INDEX_NAME)
    (hf / SHARD2).unlink()
    run = nnconv("convert", "hf", "out.pt", cwd=tmp_path)
    line = run.assert_refused("hf")
    assert "outside the model's folder" in line, line
    _assert_not_leaked(run, SENTINEL)
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_shard_symlinked_to_a_text_file_quotes_none_of_it(where, tmp_path):
    hf = _hf_folder(tmp_path / "hf")
    text = (hf if where == "inside" else tmp_path) / "notes.txt"
    text.write_bytes(SECRET_TEXT)
    (hf / SHARD2).unlink()
    (hf / SHARD2).symlink_to(text)
    run = nnconv("convert", "hf", "out.pt", cwd=tmp_path)
    line = run.assert_refused(SHARD2 if where == "inside" else "hf")
    if where == "inside":  # containment passes (a symlink inside the folder is fine)
        assert "not a safetensors file" in line, line
    _assert_not_leaked(run, SECRET_TEXT, SECRET_TEXT[8:])
    assert not (tmp_path / "out.pt").exists()


def test_symlink_inside_the_folder_is_read(tmp_path):
    hf = _hf_folder(tmp_path / "hf")
    (hf / "real.safetensors").write_bytes((hf / SHARD2).read_bytes())
    (hf / SHARD2).unlink()
    (hf / SHARD2).symlink_to("real.safetensors")
    run = nnconv("convert", "hf", "out.pt", cwd=tmp_path)
    assert run.rc == 0, run.stderr
    assert torch.load(tmp_path / "out.pt")["b.weight"].tolist() == [0, 0, 0, 0]


def test_contained_rules(tmp_path):
    """The one containment function: what it refuses, and that it opens nothing."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "ok.bin").write_bytes(b"x")
    (tmp_path / "out.bin").write_bytes(b"y")
    (folder / "up").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(folder / "pipe")
    refused = {
        "../out.bin": "'..'",
        str(tmp_path / "out.bin"): "absolute",
        "up/out.bin": "outside",
        "pipe": "named pipe",
        "nothere": "does not exist",
        "a\0b": "NUL",
        "": "not a file name",
    }
    for name, words in refused.items():
        with pytest.raises(FormatError, match=words):
            paths.contained(folder, name, subject=folder, what="file")
    target, st = paths.contained(folder, "ok.bin", subject=folder, what="file")
    assert target == (folder / "ok.bin").resolve() and st.st_size == 1
    with paths.writing(folder / "ok.bin"), pytest.raises(FormatError, match="being written"):
        paths.contained(folder, "ok.bin", subject=folder, what="file")


# --- inputs that are not regular files -----------------------------------------------


def test_folder_whose_only_safetensors_is_a_fifo(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    for argv in (["inspect", "m"], ["convert", "m", "out.pt"]):
        run = nnconv(*argv, cwd=tmp_path, timeout=30)
        line = run.assert_refused("m")
        assert "named pipe" in line, line
        assert run.wall_s < WALL_LIMIT_S, run.wall_s


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_fifo_as_input_is_refused_at_once(command, tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    argv = ["inspect", "model.safetensors"]
    if command == "convert":
        argv = ["convert", "model.safetensors", "out.pt"]
    run = nnconv(*argv, cwd=tmp_path, timeout=30)
    line = run.assert_refused("model.safetensors")
    assert "named pipe" in line, line
    assert run.wall_s < WALL_LIMIT_S, run.wall_s
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_char_device_as_input_is_refused(command, tmp_path):
    argv = ["inspect", "/dev/zero"] if command == "inspect" else ["convert", "/dev/zero", "o.pt"]
    run = nnconv(*argv, cwd=tmp_path, timeout=30)
    line = run.assert_refused("/dev/zero")
    assert "character device" in line, line
    run.assert_bounded()
    assert os.listdir(tmp_path) == []


# --- --force and existing folders -----------------------------------------------------


@pytest.fixture
def project(tmp_path) -> Path:
    """proj/ with a model and a user's own file beside it."""
    proj = tmp_path / "proj"
    proj.mkdir()
    save_file({"w": torch.arange(6.0)}, proj / "model.safetensors")
    (proj / "train.py").write_text("print('my code')\n")
    return proj


@pytest.mark.parametrize(
    "argv",
    [
        ["proj/model.safetensors", "proj", "--to", "safetensors"],  # DIR/<stem>.ext is the source
        ["proj", "proj", "--to", "pt"],  # the source folder itself
        ["proj", "proj/sub", "--to", "pt"],
        ["proj", "proj", "--to", "safetensors", "--shard-size", "1KB"],
    ],
    ids=["file-onto-itself", "folder-onto-itself", "inside-source-folder", "shards-onto-source"],
)
def test_force_onto_a_folder_holding_the_source_is_refused(argv, project, tmp_path):
    (project / "sub").mkdir()
    before = sha_tree(project)
    run = nnconv("convert", *argv, "--force", cwd=tmp_path)
    run.assert_refused()
    assert sha_tree(project) == before
    assert sorted(os.listdir(project)) == ["model.safetensors", "sub", "train.py"]


def test_force_onto_the_source_folder_writes_beside(project, tmp_path):
    """The observed attack: this used to delete proj/ with the source and train.py."""
    argv = ["convert", "proj/model.safetensors", "proj", "--to", "pt", "--force"]
    _written_beside(argv, project, tmp_path, "proj/model.pt (pt)")
    assert torch.load(project / "model.pt")["w"].tolist() == list(range(6))


def _written_beside(argv: list, folder: Path, cwd: Path, shown: str) -> None:
    """``nnconv ARGV`` exits 0, says it wrote ``shown``, and adds one file to ``folder``,
    changing none that were there."""
    before = sha_tree(folder)
    run = nnconv(*argv, cwd=cwd)
    assert run.rc == 0, run.stderr
    assert f"-> {shown}" in run.stdout, run.stdout
    after = sha_tree(folder)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {Path(shown.split()[0]).name}


def test_force_onto_a_folder_with_unrelated_files(tmp_path):
    src = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, src)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "README.md").write_text("mine")
    (out / "sub" / "data.csv").write_text("1,2,3")
    argv = ["convert", "model.pt", "out", "--to", "safetensors", "--force"]
    _written_beside(argv, out, tmp_path, "out/model.safetensors (safetensors)")
    assert load_file(out / "model.safetensors")["w"].tolist() == [1, 1, 1]


def test_library_force_never_replaces_a_folder_with_other_files(tmp_path):
    out = tmp_path / "out.safetensors"
    out.mkdir()
    (out / "README.md").write_text("mine")
    with pytest.raises(Exception, match="folder holding other files"):
        save({"w": torch.ones(3)}, out, force=True)
    assert os.listdir(out) == ["README.md"]


def _hf_project(tmp_path: Path) -> Path:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "README.md").write_text("# my model\n")
    (hf / "config.json").write_text('{"hidden": 4}')
    return hf


def _model(tmp_path: Path, n: int = 4) -> Path:
    src = tmp_path / "model.pt"
    torch.save({f"layer{i}.weight": torch.full((100,), float(i)) for i in range(n)}, src)
    return src


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("model"))


def test_shards_into_a_folder_keep_its_files(tmp_path):
    hf = _hf_project(tmp_path)
    _model(tmp_path)
    before = sha_tree(hf)
    run = nnconv(
        "convert", "model.pt", "hf", "--to", "safetensors", "--shard-size", "1KB", cwd=tmp_path
    )
    assert run.rc == 0, run.stderr
    after = sha_tree(hf)
    assert {k: after[k] for k in before} == before
    assert _shards(hf) == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)] + [INDEX_NAME]
    assert not [n for n in os.listdir(hf) if "nnconv-tmp" in n]
    run = nnconv("inspect", "hf", "--json", cwd=tmp_path)
    assert run.rc == 0 and len(json.loads(run.stdout)["tensors"]) == 4, run.stderr


def test_stale_shards_need_force_and_only_they_are_replaced(tmp_path):
    hf = _hf_project(tmp_path)
    _model(tmp_path)
    argv = ["convert", "model.pt", "hf", "--to", "safetensors"]
    assert nnconv(*argv, "--shard-size", "1KB", cwd=tmp_path).rc == 0  # 2 shards
    (hf / "model-00007-of-00009.safetensors").write_bytes(b"stale, from some older run")
    before = sha_tree(hf)
    run = nnconv(*argv, "--shard-size", "300B", cwd=tmp_path)
    run.assert_refused("hf")
    assert "--force" in run.error_line
    assert sha_tree(hf) == before

    run = nnconv(*argv, "--shard-size", "300B", "--force", cwd=tmp_path)  # 4 shards
    assert run.rc == 0, run.stderr
    assert _shards(hf) == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + [
        INDEX_NAME
    ]
    assert (hf / "README.md").read_text() == "# my model\n"
    assert (hf / "config.json").read_text() == '{"hidden": 4}'
    assert sorted(os.listdir(hf)) == sorted(["README.md", "config.json", *_shards(hf)])


def test_force_onto_an_exact_previous_sharded_output_replaces_it(tmp_path):
    _model(tmp_path)
    out = tmp_path / "out.safetensors"
    save({f"old{i}": torch.arange(100.0) for i in range(4)}, out, shard_size="400B")
    assert len(_shards(out)) == 5  # 4 shards and the index
    run = nnconv(
        "convert", "model.pt", "out.safetensors", "--shard-size", "1KB", "--force", cwd=tmp_path
    )
    assert run.rc == 0, run.stderr
    assert sorted(os.listdir(out)) == [SHARD1, SHARD2, INDEX_NAME]
    index = json.loads((out / INDEX_NAME).read_text())
    assert sorted(index["weight_map"]) == [f"layer{i}.weight" for i in range(4)]


def test_safetensors_into_a_hugging_face_folder_is_written_as_shards(tmp_path):
    """A folder already holding an index gets shards and an index (as save_pretrained
    writes), not a lone DIR/model.safetensors beside a stale index."""
    hf = _hf_project(tmp_path)
    _model(tmp_path)
    argv = ["convert", "model.pt", "hf", "--to", "safetensors"]
    assert nnconv(*argv, "--shard-size", "300B", cwd=tmp_path).rc == 0  # 4 shards
    nnconv(*argv, cwd=tmp_path).assert_refused("hf")  # they are replaced only with --force
    run = nnconv(*argv, "--force", cwd=tmp_path)
    assert run.rc == 0, run.stderr
    assert "-> hf (safetensors)" in run.stdout, run.stdout
    assert sorted(os.listdir(hf)) == [
        "README.md",
        "config.json",
        "model-00001-of-00001.safetensors",
        INDEX_NAME,
    ]
