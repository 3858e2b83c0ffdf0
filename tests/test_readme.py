"""Every command README.md shows works as written (issue 11: acceptance, points 6 and 10).

The commands of its ```sh blocks (usage synopses aside) and, for those synopses, the
concrete commands of docs/readme_commands.txt run in README order in one temporary
folder holding a copy of fixtures/, each exiting as documented (0 unless marked
``# exits N``).  Install commands are checked for form (``.ci/run`` does the install);
the CI example's job runs against a small CNN; the wheel route is built, installed into
a fresh virtual environment and run.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CURATED = ROOT / "docs" / "readme_commands.txt"
DRIVER = ROOT / "tests" / "cli_driver.py"
_EXITS = re.compile(r"#\s*exits\s+(\d+)\s*$")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def is_synopsis(block: str) -> bool:
    """A usage synopsis (``nnconv convert SRC DST [--from F]...``), not a command."""
    return bool(re.search(r"\[--|\bSRC DST\b|\bREF CAND\b", block))


def lines_of(text: str) -> list[tuple[str, int]]:
    """(command, expected exit status) per logical line; comments and blanks dropped."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        expected = _EXITS.search(line)
        command = " ".join(shlex.split(line, comments=True))
        if command:
            out.append((command, int(expected.group(1)) if expected else 0))
    return out


def readme_commands() -> list[tuple[str, int]]:
    found = [c for b in blocks("sh") if not is_synopsis(b) for c in lines_of(b)]
    return found + lines_of(CURATED.read_text())


def parts(command: str) -> list[list[str]]:
    return [shlex.split(p) for p in command.split("&&")]


def is_install(argv: list[str]) -> bool:
    return argv[:3] == ["python", "-m", "pip"] or argv[:1] == ["pip"]


def is_pytest(argv: list[str]) -> bool:
    return argv[:3] == ["python", "-m", "pytest"]


def run_nnconv(cases: list[tuple[list[str], Path]], tmp_path: Path) -> list[tuple[int, str]]:
    """Run ``nnconv ARGV`` for each (argv, cwd) in order, in one forking driver (a fresh
    interpreter per command costs ~2 s of imports); (exit status, output) each."""
    spec = []
    for i, (argv, cwd) in enumerate(cases):
        out, err = tmp_path / f".out{i}", tmp_path / f".err{i}"
        spec.append({"argv": argv, "out": str(out), "err": str(err), "cwd": str(cwd)})
    (tmp_path / ".cases.json").write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, str(DRIVER), tmp_path / ".cases.json", tmp_path / ".results.json"],
        check=True,
        timeout=600,
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / ".results.json").read_text())
    return [
        (r["rc"], Path(c["out"]).read_text() + Path(c["err"]).read_text())
        for r, c in zip(results, spec, strict=True)
    ]


def test_the_readme_points_to_the_curated_list():
    assert "docs/readme_commands.txt" in README.read_text()
    synopses = "\n".join(b for b in blocks("sh") if is_synopsis(b))
    curated = {c.split()[1] for c, _ in lines_of(CURATED.read_text())}
    assert {"convert", "inspect", "formats", "verify"} <= curated
    assert set(re.findall(r"^nnconv (\w+)", synopses, re.M)) <= curated


def test_every_readme_command_exits_as_documented(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "fixtures", work / "fixtures")
    (work / "tmp").mkdir()
    hf = _tiny_bert(work / "my-bert")  # the Hugging Face section's folder
    cases, expected = [], []
    for command, status in readme_commands():
        if "my-bert" in command and not hf:
            continue  # transformers is an optional extra; .ci/run installs it
        for argv in parts(command):
            if is_install(argv) or is_pytest(argv):
                continue  # checked for form below; .ci/run installs and tests
            assert argv[0] == "nnconv", f"not an nnconv command: {command}"
            # the Two commands write /tmp/mlp.safetensors: a folder of the test's instead
            cases.append(([a.replace("/tmp/", f"{work}/tmp/") for a in argv[1:]], work))
            expected.append((command, status))
    assert len(cases) >= 20
    failures = [
        f"{command}\n  exit {rc}, expected {status}\n  {output[-800:]}"
        for (command, status), (rc, output) in zip(
            expected, run_nnconv(cases, tmp_path), strict=True
        )
        if rc != status
    ]
    assert not failures, "\n".join(failures)


def _tiny_bert(folder: Path) -> bool:
    """A BERT of random weights saved with ``save_pretrained``; False without transformers."""
    try:
        import transformers
    except ImportError:
        return False
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    return True


def _install_commands() -> list[list[str]]:
    found = [argv for c, _ in readme_commands() for argv in parts(c) if is_install(argv)]
    for block in blocks("yaml"):
        for line in re.findall(r"run: (.*)", block):
            found += [argv for argv in parts(line) if is_install(argv)]
    return found


def test_install_commands_are_well_formed():
    commands = _install_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci and "-e '.[test]'" in ci  # what the README says CI runs
    seen = set()
    for argv in commands:
        verb, args = argv[3] if argv[0] == "python" else argv[1], argv[4:]
        assert verb in ("install", "wheel"), argv
        if "-w" in args:  # the wheel folder, not a requirement
            assert args[args.index("-w") + 1] == "dist"
            del args[args.index("-w") : args.index("-w") + 2]
        for arg in (a for a in args if not a.startswith("-")):
            if arg in (".", ".[test]") or arg.startswith("dist/nnconv-"):
                seen.add(arg.split("-", 1)[0])
                continue
            requirement = Requirement(arg)
            assert requirement.name in ("torch", "nnconv"), arg
            if requirement.url:
                assert requirement.url.startswith("git+https://"), arg
                seen.add("git")
            else:
                assert str(requirement.specifier) == "==2.13.0", arg
    assert {".", "dist/nnconv", "git"} <= seen


NET = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
"""


def test_ci_example_runs(tmp_path):
    """The CI job's commands, in a project laid out as the example assumes."""
    (block,) = [b for b in blocks("yaml") if "nnconv verify" in b]
    script = re.search(r"run: \|\n(.*?)\n- ", block, re.S).group(1)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "weights").mkdir()
    (project / "src" / "model.py").write_text(NET)
    sys.path.insert(0, str(project / "src"))
    try:
        from model import Net

        from nnconv.converter import save

        save(Net().state_dict(), project / "weights" / "model.safetensors")
    finally:
        sys.path.remove(str(project / "src"))
        sys.modules.pop("model", None)
    cases = []
    for command, _ in lines_of(script):
        for argv in parts(command):
            if argv[0] == "mkdir":
                (project / argv[-1]).mkdir(parents=True, exist_ok=True)
            else:
                assert argv[0] == "nnconv", command
                cases.append((argv[1:], project))
    results = run_nnconv(cases, tmp_path)
    assert [rc for rc, _ in results] == [0, 0], results
    report = json.loads((project / "verify.json").read_text())
    assert report["passed"] and report["outputs_checked"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_wheel_route(tmp_path):
    """``pip wheel`` of the repository (offline: the installed setuptools), installed with
    ``--no-deps`` into a fresh venv that sees this interpreter's packages: the wheel holds
    both layers, and its ``nnconv`` runs a conversion."""
    ((wheel_cmd, install_cmd),) = [parts(c) for c, _ in readme_commands() if "pip wheel" in c]
    source = tmp_path / "source"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if not name.startswith(("tests/", "benchmarks/")) and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = [sys.executable, *wheel_cmd[1:], "--no-build-isolation", "--quiet"]
    subprocess.run(build, cwd=source, check=True, timeout=300)
    (wheel,) = (source / "dist").glob(install_cmd[-1].split("/", 1)[1])
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for package in ("nnconv/converter/", "nnconv/formats/"):
        assert any(n.startswith(package) for n in names), package
    assert any(n.endswith("entry_points.txt") for n in names)
    assert {"nnconv/__init__.py", "nnconv/__main__.py", "nnconv/py.typed"} <= set(names)  # PEP 561

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip cannot install into another environment (pip < 22.3)")
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        check=True,
        timeout=300,
    )
    nnconv = env_dir / "bin" / "nnconv"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    help_run = subprocess.run([nnconv, "--help"], cwd=outside, capture_output=True, text=True)
    assert help_run.returncode == 0 and "convert" in help_run.stdout
    where = subprocess.run(
        [python, "-c", "import nnconv.formats as f; print(f.__file__)"],
        cwd=outside,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(env_dir) in where, f"the wheel's package is not the one imported: {where}"
    out = outside / "mlp.safetensors"
    run = subprocess.run(
        [nnconv, "convert", ROOT / "fixtures" / "mlp.params", out],
        cwd=outside,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    loaded = torch.load(ROOT / "fixtures" / "mlp.params")
    from safetensors.torch import load_file

    assert all(torch.equal(loaded[k], v) for k, v in load_file(out).items())
