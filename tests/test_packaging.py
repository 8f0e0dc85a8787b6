"""The package works when installed from its wheel, not only from this checkout.

    python -m pytest -q tests/test_packaging.py

The wheel is built from a copy of the sources (the checkout gets no build/ or egg-info) and
installed without dependencies into a fresh venv. That venv borrows this environment's installed
packages (torch, transformers, ...) through a .pth file holding a plain path: Python does not run
the .pth files of a folder added that way, so the checkout's editable install stays invisible and
``python3_distillation`` can only come from the wheel. Its console script then runs from an empty
folder: named configs, templates and the command list must all come from inside the package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from python3_distillation import paths

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python3_distillation"
CONFIG_NAMES = sorted(p.stem for p in (PACKAGE / "configs").glob("*.yaml"))


def _copy_sources(dest: Path) -> None:
    """pyproject.toml, README.md and the package, without trained models, caches or temp folders."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    models = {d.name for d in paths.MODEL_DIRS.values() if d.parent == PACKAGE}
    shutil.copytree(PACKAGE, dest / PACKAGE.name, ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or n.startswith(".") or (Path(folder) == PACKAGE and n in models)])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel, a venv with it installed, a clean environment and an empty working folder."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, wheels, venv, work = tmp / "src", tmp / "wheels", tmp / "venv", tmp / "work"
    for d in (src, work, work / "data", work / "home"):
        d.mkdir()
    _copy_sources(src)
    # No build isolation when this environment has setuptools: nothing to download, and faster.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation,
                            "--no-cache-dir", "--wheel-dir", str(wheels), str(src)],
                           capture_output=True, text=True, timeout=180)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("python3_distillation-*.whl")

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    # Installed before the borrowed packages are visible, so pip sees no other copy to replace.
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                              "--no-deps", "--no-index", "--no-compile", str(wheel)],
                             capture_output=True, text=True, timeout=180)
    assert install.returncode == 0, install.stderr[-3000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    borrowed = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_borrowed_packages.pth").write_text("".join(f"{p}\n" for p in borrowed), encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "DISTILL_"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin", HOME=str(work / "home"), HF_HUB_OFFLINE="1",
               DISTILL_DATA_DIR=str(work / "data"))
    return {"wheel": wheel, "venv": venv, "python": python, "work": work, "env": env}


def run(installed: dict, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=installed["work"], env=installed["env"],
                          capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_configs_templates_and_static_files(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert CONFIG_NAMES and {f"python3_distillation/configs/{n}.yaml" for n in CONFIG_NAMES} <= names
    for folder in ("templates", "static"):
        shipped = {p.relative_to(REPO).as_posix() for p in (PACKAGE / folder).rglob("*") if p.is_file()}
        assert shipped and shipped <= names, f"{folder}/ files missing from the wheel: {shipped - names}"
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".pt"))], "model weights in the wheel"


def test_installed_package_is_the_wheel_and_finds_its_configs(installed):
    probe = ("import python3_distillation as p, python3_distillation.config as c\n"
             f"for name in {CONFIG_NAMES!r}:\n"
             "    print(name, c.load_config([name]).stage)\n"
             "print(p.__file__)\n")
    proc = run(installed, installed["python"], "-c", probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *stages, where = proc.stdout.split("\n")[:-1]
    assert Path(where).is_relative_to(installed["venv"]), f"imported from {where}, not the installed wheel"
    assert [line.split()[0] for line in stages] == CONFIG_NAMES


def test_console_script_resolves_config_names(installed):
    script = installed["venv"] / "bin" / "gpt2-distill"
    assert script.exists()
    proc = run(installed, script, "distill", "--config", "v2", "--help")
    assert proc.returncode == 0 and "--config" in proc.stdout, proc.stderr[-3000:]
    # The teacher command refuses the v2 config by its stage: the name was found and read.
    proc = run(installed, script, "teacher", "--config", "v2")
    assert proc.returncode == 2 and "stage 'distill'" in proc.stderr, proc.stderr[-3000:]


def test_console_script_generates_with_a_saved_model(installed, tokenizer):
    from conftest import tiny_gpt2

    model = installed["work"] / "tiny-model"
    tiny_gpt2().save_pretrained(model)
    tokenizer.save_pretrained(model)
    proc = run(installed, installed["venv"] / "bin" / "gpt2-distill", "infer", "--model", model, "Hello",
               "--max-new-tokens", "3", "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "no completion printed"


def test_module_entry_point_docstring_names_every_command():
    """``python -m python3_distillation``'s docstring lists exactly the CLI's commands."""
    import ast

    from python3_distillation.cli import COMMANDS

    doc = ast.get_docstring(ast.parse((PACKAGE / "__main__.py").read_text(encoding="utf-8")))
    usage = doc.splitlines()[0].split()  # "python -m python3_distillation a|b|c ..."
    assert usage[:3] == ["python", "-m", "python3_distillation"]
    assert usage[3].split("|") == list(COMMANDS)
