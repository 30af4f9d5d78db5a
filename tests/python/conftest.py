"""tests/python/conftest.py — shared pytest fixtures for the Python-driven tests.

Fixtures:
  repo_root    the mneme checkout (two levels above this file)
  build_dir    env MNEME_BUILD_DIR, else <repo>/build
  mneme_bin    <build_dir>/mneme; the test FAILS (with the path it looked at) if missing,
               so a missing build never passes as a silent skip
  model_path   the real SmolLM2 model: env MNEME_MODEL, else
               $MNEME_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf, else
               ~/.cache/mneme/SmolLM2-135M-Instruct.Q4_1.gguf. Missing => FAIL, unless
               MNEME_ALLOW_NO_MODEL=1, which turns it into a skip (for machines that
               deliberately have no model)
  gen_gguf     the tools/gen_gguf.py module (synthetic model writer)
  synth_model  factory: synth_model(**opts) -> path of a cached synthetic GGUF
  run_mneme    helper: run_mneme(args, timeout=...) -> CompletedProcess, failing the test
               with stderr on a non-zero exit
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# Keep BLAS single-threaded before numpy is imported anywhere (see ref_forward.py).
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def build_dir() -> Path:
    return Path(os.environ.get("MNEME_BUILD_DIR") or REPO / "build")


@pytest.fixture(scope="session")
def mneme_bin(build_dir: Path) -> Path:
    exe = build_dir / "mneme"
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        pytest.fail(f"mneme binary not found at {exe}: build it (ninja -C {build_dir} mneme) "
                    f"or point MNEME_BUILD_DIR at a build directory", pytrace=False)
    return exe


def find_model() -> Path | None:
    """Where the real model should be, whether or not it is there."""
    if os.environ.get("MNEME_MODEL"):
        return Path(os.environ["MNEME_MODEL"])
    if os.environ.get("MNEME_MODELS"):
        return Path(os.environ["MNEME_MODELS"]) / MODEL_FILE
    return Path.home() / ".cache" / "mneme" / MODEL_FILE


@pytest.fixture(scope="session")
def model_path() -> Path:
    p = find_model()
    if p.is_file():
        return p
    msg = (f"real model not found at {p} (set MNEME_MODEL or MNEME_MODELS, or run the setup "
           f"script to fetch it)")
    if os.environ.get("MNEME_ALLOW_NO_MODEL") == "1":
        pytest.skip(msg + "; skipped because MNEME_ALLOW_NO_MODEL=1")
    pytest.fail(msg, pytrace=False)


@pytest.fixture(scope="session")
def gen_gguf(repo_root: Path):
    src = repo_root / "tools" / "gen_gguf.py"
    if not src.is_file():
        pytest.fail(f"{src} is missing (synthetic model generator)", pytrace=False)
    spec = importlib.util.spec_from_file_location("gen_gguf", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "generate"):
        pytest.fail(f"{src} has no generate(path, **opts)", pytrace=False)
    return mod


@pytest.fixture(scope="session")
def synth_model(gen_gguf, tmp_path_factory):
    """Factory writing (once per option set per session) a synthetic model."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("synth")

    def make(**opts) -> Path:
        key = repr(sorted(opts.items()))
        if key not in made:
            name = hashlib.sha1(key.encode()).hexdigest()[:12] + ".gguf"
            path = root / name
            gen_gguf.generate(str(path), **opts)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def run_mneme(mneme_bin: Path):
    def run(args, timeout: float = 120.0) -> subprocess.CompletedProcess:
        cmd = [str(mneme_bin)] + [str(a) for a in args]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}", pytrace=False)
        if p.returncode != 0:
            pytest.fail(f"exit {p.returncode}: {' '.join(cmd)}\nstderr:\n{p.stderr[-4000:]}",
                        pytrace=False)
        return p

    return run
