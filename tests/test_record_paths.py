"""The architecture record finds its model class again from any folder (issue 11, point 7).

A file written with ``--model path/models.py:MLP`` records the class file's path
relative to the file's own folder (``module_file``); ``--trust-code`` then rebuilds it
wherever nnconv runs, and a hint that names a ``--model`` names a file that exists from
the working folder (else a ``path/to/`` placeholder), so the two never contradict.
Older records (``file``: a bare name or a path relative to where they were written)
keep reading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from redteam import nnconv

from nnconv.converter import load, locate, models, record, save
from nnconv.converter.inputs import InputSpec
from nnconv.formats.errors import UsageError
from nnconv.formats.objects import from_object

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


def _record_of(path: Path) -> dict:
    with load(path) as ckpt:
        return json.loads(ckpt.metadata[record.ARCHITECTURE_KEY])


def test_verify_from_another_folder_follows_its_own_hint(tmp_path):
    (tmp_path / "run").mkdir(), (tmp_path / "out").mkdir(), (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "out" / "mlp.safetensors"
    # written from a folder the class file is not under (the old record kept "models.py")
    spec = f"{FIXTURES / 'models.py'}:MLP"
    run = nnconv("convert", FIXTURES / "mlp.params", out, "--model", spec, cwd=tmp_path / "run")
    assert run.rc == 0, run.stderr
    root = _record_of(out)["root"]
    assert root["module_file"] == os.path.relpath(FIXTURES / "models.py", out.parent)
    assert "file" not in root

    where = tmp_path / "elsewhere"
    first = nnconv("verify", "../out/mlp.safetensors", "../out/mlp.safetensors", cwd=where)
    assert first.rc == 0, first.stderr
    told = first.stdout + first.stderr
    assert "pass --trust-code" in told and "--model" not in told.replace("--model path", "")
    # the hint, run as given
    second = nnconv(
        "verify", "../out/mlp.safetensors", "../out/mlp.safetensors", "--trust-code", cwd=where
    )
    assert second.rc == 0, second.stderr
    assert "not runnable" not in second.stdout and "NOT checked" not in second.stdout
    alone = nnconv("verify", "../out/mlp.safetensors", "--trust-code", cwd=where)
    assert alone.rc == 0, alone.stderr


def _mlp_file(tmp_path: Path, **locate_args) -> tuple[Path, dict]:
    """An MLP checkpoint carrying a record built for ``tmp_path / 'out'``."""
    net = models.instantiate(models.parse_spec(f"{FIXTURES / 'models.py'}:MLP"))
    rec = record.build(net, [InputSpec("input", (2, 20))], model_args={}, **locate_args)
    return net, rec


def _write(path: Path, net, rec: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = from_object(net.state_dict())
    ckpt.metadata = {record.ARCHITECTURE_KEY: record.dumps(rec)}
    save(ckpt, path)
    return path


def test_record_moves_with_its_class_file(tmp_path, monkeypatch):
    shutil.copy(FIXTURES / "models.py", tmp_path / "models.py")
    spec = models.parse_spec(f"{tmp_path / 'models.py'}:MLP")
    net = models.instantiate(spec)
    rec = record.build(net, [], model_args={}, folder=tmp_path / "weights")
    assert rec["root"]["module_file"] == "../models.py"
    moved = tmp_path / "moved"
    (moved / "weights").mkdir(parents=True)
    shutil.move(tmp_path / "models.py", moved / "models.py")
    path = _write(moved / "weights" / "mlp.safetensors", net, rec)
    monkeypatch.chdir(tmp_path)
    loaded = models.load_model(Path("moved/weights/mlp.safetensors"), trust_code=True)
    x = torch.randn(2, 20)
    assert torch.equal(loaded.module(x), net.eval()(x))
    # the class file gone: the hint is a placeholder, never a path that does not exist
    (moved / "models.py").unlink()
    with pytest.raises(UsageError) as err:
        models.load_model(path, trust_code=True)
    assert "path/to/models.py:MLP" in str(err.value) and "not where the record says" in str(
        err.value
    )


@pytest.mark.parametrize("recorded", ["models.py", "fixtures/models.py"])
def test_old_records_keep_reading(tmp_path, monkeypatch, recorded):
    net, rec = _mlp_file(tmp_path)
    rec["root"]["class"] = "nnconv_no_such_module.models:MLP"  # not importable anywhere
    rec["root"]["file"] = recorded
    path = _write(tmp_path / "out" / "mlp.safetensors", net, rec)
    # from where the recorded (working-folder-relative) file exists: it is used
    monkeypatch.chdir(FIXTURES.parent if "/" in recorded else FIXTURES)
    loaded = models.load_model(path, trust_code=True)
    assert type(loaded.module).__name__ == "MLP"
    # from elsewhere: the hint does not name a file that is not there
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as err:
        models.load_model(path, trust_code=True)
    hint = re.search(r"--model (\S+):MLP", err.value.remedy).group(1)
    assert hint == "path/to/models.py"


def test_a_found_file_is_shown_from_the_working_folder(tmp_path, monkeypatch):
    node = {"class": "x:MLP", "module_file": "../fixtures/models.py"}
    monkeypatch.chdir(tmp_path)
    found = locate.class_file(node, ROOT / "tests")
    assert found is not None and locate.shown(found) == os.path.relpath(FIXTURES / "models.py")
    assert locate.class_file(node, tmp_path) is None
    assert locate.base_folder(str(ROOT / "fixtures" / "mlp.safetensors")) == FIXTURES
    assert locate.base_folder(str(FIXTURES)) == FIXTURES


def test_record_without_a_folder_keeps_the_older_form(monkeypatch):
    monkeypatch.chdir(ROOT)
    net = models.instantiate(models.parse_spec("fixtures/models.py:MLP"))
    root = record.build(net, [])["root"]
    assert root["file"] == "fixtures/models.py" and "module_file" not in root
    with pytest.raises(Exception, match="file is not a path"):
        record.loads(json.dumps({"version": 1, "root": {**root, "module_file": 3}}))
