"""llama.cpp, built once from source on this machine, for the engine comparison and the GGUF test.

    python benchmarks/llama_cpp.py            # build (or find) it; prints where the binaries are
    LLAMA_CPP_DIR=~/llama.cpp python benchmarks/llama_cpp.py   # use an existing build instead

The source is the llama.cpp tree vendored in the ``llama-cpp-python`` source archive (a pinned
version, fetched with ``pip download --no-binary :all:``; nothing is installed), built with CMake
for this CPU (``GGML_NATIVE``) and cached under ``<data dir>/llama.cpp/llama-cpp-python-<version>/``
(``build/bin/`` holds the binaries). A second call reuses the build; a file lock keeps two processes
from building at once. Only the programs the project uses are built:

- ``llama-server``: the OpenAI-style server (served requests/s; exact greedy token ids in the test);
- ``llama-bench``: prompt processing and batch-1 generation speed;
- ``llama-batched-bench``: decoding N sequences together in one batch per step (batch-8 speed).

Some virtual machines list AMX in /proc/cpuinfo but fault on its tile instructions (ggml's q8_0
matrix products then die with SIGILL); a 20-line probe finds that and the build leaves AMX out.

``$LLAMA_CPP_DIR`` points at another build (a folder with ``build/bin/``); it is used as it is and
never built. Without cmake or a C++ compiler, ``ensure_built()`` returns ``(None, reason)``.
Building takes ~10 minutes on 2 cores (run it under ``nice``, it uses ``BUILD_JOBS`` processes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the llama.cpp we build
PACKAGE = "llama-cpp-python"
TARGETS = ("llama-server", "llama-bench", "llama-batched-bench")
BUILD_JOBS = 2
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # this CPU's instruction sets (AVX2, AVX-512 where present)
    "-DLLAMA_CURL=OFF",  # no downloads from the binaries (deprecated in this tree: a warning only)
    "-DLLAMA_OPENSSL=OFF",  # loopback HTTP only
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",  # llama-bench, llama-batched-bench
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # the server's web page is not needed (and would be downloaded)
)


def cache_dir() -> Path:
    """Where this version's source and build live (the data dir, see python3_distillation.paths)."""
    from python3_distillation.paths import data_dir

    return data_dir() / "llama.cpp" / f"{PACKAGE}-{VERSION}"


def _root() -> tuple[Path, bool]:
    """(the llama.cpp folder, whether it is an override that must not be built)."""
    override = os.environ.get("LLAMA_CPP_DIR")
    if override:
        return Path(override).expanduser(), True
    return cache_dir(), False


def _bin_dir(root: Path) -> Path:
    return root / "build" / "bin"


def find_binaries() -> dict[str, Path] | None:
    """``{"llama-server": path, ...}`` for every program in TARGETS when all are built, else None."""
    root, _ = _root()
    found = {}
    for name in TARGETS:
        for path in (_bin_dir(root) / name, root / name):
            if path.is_file() and os.access(path, os.X_OK):
                found[name] = path
                break
        else:
            return None
    return found


def missing_tools() -> str | None:
    """Why this machine cannot build llama.cpp (no cmake, no C/C++ compiler), or None when it can."""
    missing = [t for t in ("cmake",) if shutil.which(t) is None]
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c):
        missing.append("a C++ compiler (c++/g++/clang++)")
    if not any(shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c):
        missing.append("a C compiler (cc/gcc/clang)")
    return f"cannot build llama.cpp: missing {', '.join(missing)}" if missing else None


# AMX tile instructions: some virtual machines list amx_tile in /proc/cpuinfo and grant the kernel
# permission, yet fault (SIGILL) on the first tile instruction; then -march=native must leave AMX out,
# or every q8_0 matrix product (ggml's AMX path) kills the program.
_AMX_PROBE = r"""
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <immintrin.h>
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023, 18)) return 2;  /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA */
    struct { uint8_t palette, start; uint8_t pad[14]; uint16_t colsb[16]; uint8_t rows[16]; }
        __attribute__((aligned(64))) cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1; cfg.rows[0] = 16; cfg.colsb[0] = 64;
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_release();
    return 0;
}
"""
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def amx_faults() -> bool:
    """Whether this CPU lists AMX but a tile instruction does not run (see _AMX_PROBE)."""
    try:
        if "amx_tile" not in Path("/proc/cpuinfo").read_text():
            return False
    except OSError:
        return False
    cc = shutil.which(os.environ.get("CC", "") or "cc") or shutil.which("gcc")
    if cc is None:
        return False
    with tempfile.TemporaryDirectory(prefix="amx-probe-") as tmp:
        src, exe = Path(tmp) / "probe.c", Path(tmp) / "probe"
        src.write_text(_AMX_PROBE)
        built = subprocess.run([cc, "-O1", "-march=native", str(src), "-o", str(exe)], capture_output=True)
        if built.returncode != 0:  # a compiler without AMX: -march=native will not use it either
            return False
        return subprocess.run([str(exe)], capture_output=True).returncode != 0


def cmake_options() -> list[str]:
    options = list(CMAKE_OPTIONS)
    if amx_faults():
        options += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    return options


def _run(cmd: list[str], log, cwd: Path | None = None) -> None:
    log.write(f"$ {' '.join(cmd)}\n".encode())
    log.flush()
    subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=True)


def _fetch_source(dest: Path, log) -> None:
    """Download the source archive and extract its ``vendor/llama.cpp`` into ``dest`` (atomically)."""
    with tempfile.TemporaryDirectory(prefix="llama-cpp-src-", dir=dest.parent) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"{PACKAGE}=={VERSION}", "-d", tmp], log)
        archives = sorted(Path(tmp).glob("*.tar.gz"))
        if not archives:
            raise RuntimeError(f"pip download wrote no source archive of {PACKAGE}=={VERSION}")
        with tarfile.open(archives[0]) as tar:
            top = tar.getnames()[0].split("/")[0]
            prefix = f"{top}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise RuntimeError(f"{archives[0].name} has no vendor/llama.cpp")
            tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / top / "vendor" / "llama.cpp", dest)


def _build(root: Path, log_path: Path) -> None:
    src = root / "src"
    with open(log_path, "ab") as log:
        if not (src / "CMakeLists.txt").is_file():
            shutil.rmtree(src, ignore_errors=True)
            _fetch_source(src, log)
        build = root / "build"
        options = cmake_options()
        if NO_AMX in " ".join(options):
            log.write(b"AMX is listed by the CPU but faults here: building without it\n")
        _run(["cmake", "-S", str(src), "-B", str(build), *options], log)
        _run(["cmake", "--build", str(build), "--config", "Release", "-j", str(BUILD_JOBS),
              "--target", *TARGETS], log)


def ensure_built(quiet: bool = False) -> tuple[dict[str, Path] | None, str]:
    """The binaries (building them first if needed) and a line saying where they came from; on
    failure ``(None, reason)``: the reason names the log with the compiler's output."""
    found = find_binaries()
    root, override = _root()
    if found:
        return found, f"llama.cpp at {root}"
    if override:
        return None, f"$LLAMA_CPP_DIR={root} lacks {', '.join(TARGETS)} in build/bin/"
    why = missing_tools()
    if why:
        return None, why
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "build.log"
    with FileLock(str(root) + ".lock"):
        found = find_binaries()  # another process may have built it while we waited
        if found:
            return found, f"llama.cpp at {root}"
        if not quiet:
            print(f"building llama.cpp ({PACKAGE} {VERSION}'s vendored tree) in {root}; "
                  f"~10 minutes on 2 cores; log: {log_path}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            _build(root, log_path)
        except (OSError, subprocess.CalledProcessError, RuntimeError, tarfile.TarError) as e:
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
            return None, f"llama.cpp build failed ({e}); see {log_path}" + (f"\n{tail}" if not quiet else "")
        minutes = (time.monotonic() - t0) / 60
        found = find_binaries()
        if not found:
            return None, f"llama.cpp built but {', '.join(TARGETS)} not all in {_bin_dir(root)}; see {log_path}"
        if not quiet:
            print(f"llama.cpp built in {minutes:.1f} min", file=sys.stderr)
        return found, f"llama.cpp at {root}, built in {minutes:.1f} min"


class LlamaServer:
    """``llama-server`` on a free loopback port, stopped (its whole process group) on exit.

        with LlamaServer(binaries["llama-server"], "m.gguf", "-np", "16", "-t", "2") as srv:
            urlopen(f"http://127.0.0.1:{srv.port}/health")
    """

    def __init__(self, binary: str | Path, model: str | Path, *args: str, log_path: str | Path | None = None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> LlamaServer:
        import http.client

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}): "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        log = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"llama-server not ready after {timeout} s: {log}")

    def post(self, path: str, body: dict) -> dict:
        """One JSON request → the JSON answer (raises on an HTTP error)."""
        import http.client
        import json

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"llama-server {path}: HTTP {resp.status}: {data[:300]!r}")
        return json.loads(data)

    def __enter__(self) -> LlamaServer:
        try:
            return self.wait_ready()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only what we started
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


if __name__ == "__main__":
    binaries, why = ensure_built()
    print(why)
    for name, path in (binaries or {}).items():
        print(f"{name}: {path}")
    raise SystemExit(0 if binaries else 1)
