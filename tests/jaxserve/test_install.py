"""jaxserve as a user installs it: the built wheel in a fresh venv, used from a directory outside
the repository, and the container images that install the same wheel.

- The wheel (`pip wheel .`) goes into a new venv with its dependencies from the package index
  (the one configured for pip, as in CI), nothing of the repository on the path. From a scratch
  directory that has folders named `models/` and `pallas_kernels/` of its own (research code
  often does), `jaxserve presets`, `LLM(config="cpu")` + generate and `jaxserve serve --config cpu`
  (health, then a completion) must work.
- The Dockerfiles (`Dockerfile` for CPU, `docker/Dockerfile.cuda`, `docker/Dockerfile.tpu`): their
  entry point and default flags are checked against our CLI parser and presets; their install
  step (the wheel with the platform's extra) is dry-run with pip in the fresh venv; the CPU image is
  built and served with `docker` where a docker daemon answers (skipped, saying so, where not).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from jaxserve.entrypoints.cli import build_parser
from jaxserve.presets import preset_names

ROOT = Path(__file__).parents[2]
DOCKERFILES = {"cpu": ROOT / "Dockerfile", "cuda": ROOT / "docker" / "Dockerfile.cuda",
               "tpu": ROOT / "docker" / "Dockerfile.tpu"}
START_TIMEOUT_S = 300


def _run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_dockerfile(path: Path) -> dict:
    """The instructions we rely on: ARG defaults, ENTRYPOINT and CMD (exec form), EXPOSE, RUN lines."""
    text = path.read_text().replace("\\\n", " ")
    out: dict = {"args": {}, "run": [], "expose": [], "from": []}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG":
            name, _, default = rest.partition("=")
            out["args"][name] = shlex.split(default)[0] if default.strip() not in ("", '""') else ""
        elif op in ("ENTRYPOINT", "CMD"):
            out[op.lower()] = json.loads(rest)
        elif op == "EXPOSE":
            out["expose"] += [int(p) for p in rest.split()]
        elif op == "RUN":
            out["run"].append(rest)
        elif op == "FROM":
            out["from"].append(rest)
    return out


# --- the Dockerfiles against the CLI ---------------------------------------------------------------


@pytest.mark.parametrize("platform", sorted(DOCKERFILES))
def test_dockerfile_serves_with_flags_and_a_preset_that_exist(platform):
    spec = parse_dockerfile(DOCKERFILES[platform])
    assert spec["entrypoint"] == ["jaxserve", "serve"]
    args = build_parser().parse_args(["serve", *spec["cmd"]])  # an unknown flag exits here
    assert args.config in preset_names(), f"{platform} image's preset {args.config!r} is not packaged"
    assert args.host == "0.0.0.0", "a container must listen on every interface"
    assert sorted(spec["expose"]) == sorted([args.http_port, args.grpc_port])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extra = spec["args"]["JAXSERVE_EXTRA"]
    assert extra == ("" if platform == "cpu" else platform)
    assert extra == "" or extra in extras
    assert any("pip install" in r and "JAXSERVE_EXTRA" in r for r in spec["run"])


# --- the wheel in a fresh venv ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv python, wheel path, scratch dir, env): the wheel and its dependencies, nothing else."""
    tmp = tmp_path_factory.mktemp("install")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(ROOT)], 600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("jaxserve-*.whl")
    base_python = getattr(sys, "_base_executable", sys.executable)
    # --upgrade-deps: the current pip, as `make` uses (the one ensurepip bundles resolved the CUDA
    # extra's dry run in 32 s instead of 16, and installed the wheel in 42 s instead of 31).
    made = _run([base_python, "-m", "venv", "--upgrade-deps", str(tmp / "venv")], 300)
    assert made.returncode == 0, made.stderr
    python = tmp / "venv" / "bin" / "python"
    # --no-compile: Python compiles each module when it is first imported instead of pip compiling
    # every module of every dependency up front (22 of those 31 s).
    installed = _run([str(python), "-m", "pip", "install", "-q", "--no-compile", str(wheel)], 1200)
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"the package index cannot install the wheel's dependencies: {installed.stderr[-500:]}")
    assert installed.returncode == 0, installed.stderr
    # The user's folder: its own `models` and `pallas_kernels` packages must not shadow or break ours.
    work = tmp / "work"
    for name in ("models", "pallas_kernels"):
        (work / name).mkdir(parents=True)
        (work / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package was imported')\n")
    # PYTHONDONTWRITEBYTECODE is dropped as well (set where the tests run here, not on a user's
    # machine): with --no-compile, the first process then writes the bytecode of what it imports
    # and the later ones read it, instead of each compiling jax and transformers from source.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    env.update(JAXSERVE_CACHE_DIR=str(tmp / "cache"), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}")
    return python, wheel, work, env


def test_wheel_installs_outside_the_repository(wheel_venv):
    python, _, work, env = wheel_venv
    where = _run([str(python), "-c", "import jaxserve, jaxserve.models, jaxserve.kernels, jaxserve.configs; "
                  "print(jaxserve.__file__); print(jaxserve.models.__file__)"], 120, cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert "site-packages" in line and not line.startswith(str(ROOT)), where.stdout
    # No generic top-level names in site-packages.
    site = Path(where.stdout.split()[0]).parents[1]
    assert not (site / "models").exists() and not (site / "pallas_kernels").exists()

    listed = _run([str(python.parent / "jaxserve"), "presets"], 120, cwd=work, env=env)
    assert listed.returncode == 0, listed.stderr
    for name in ("cpu", "tpu-v5e-8", "gpu-h200-1"):
        assert re.search(rf"^{re.escape(name)}\s", listed.stdout, re.M), listed.stdout


def test_llm_with_the_cpu_preset_generates_from_a_users_folder(wheel_venv):
    python, _, work, env = wheel_venv
    script = work / "script.py"
    script.write_text(textwrap.dedent("""\
        from jaxserve import LLM, SamplingParams
        llm = LLM(config="cpu")  # the demo model
        out = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=5, temperature=0.0))
        print("TOKENS", len(out[0].outputs[0].token_ids))
        """))
    ran = _run([str(python), str(script)], 600, cwd=work, env=env)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-4000:]
    assert "TOKENS 5" in ran.stdout


def test_jaxserve_serve_with_the_cpu_preset_answers(wheel_venv):
    python, _, work, env = wheel_venv
    port = _free_port()
    proc = subprocess.Popen([str(python.parent / "jaxserve"), "serve", "--config", "cpu", "--grpc-port", "-1",
                             "--http-port", str(port)], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "not serving in time"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    # This venv has no torch, as after a plain install: transformers' advice about it is not shown
    logged = proc.stdout.read()
    assert "INFO jaxserve" in logged and "PyTorch was not found" not in logged, logged[-3000:]


# The CUDA image's dry run resolves jax's CUDA plugin and the NVIDIA wheels (20 s here) and is marked
# slow; the TPU image's runs the same check in make test.
@pytest.mark.parametrize("platform", [pytest.param("cuda", marks=pytest.mark.slow), "tpu"])
def test_accelerator_images_install_step_resolves(wheel_venv, platform):
    """The GPU / TPU images' Python layer, dry-run on CPU: pip resolves the wheel with the image's
    extra (jax's CUDA plugin / libtpu) without installing it."""
    python, wheel, work, env = wheel_venv
    extra = parse_dockerfile(DOCKERFILES[platform])["args"]["JAXSERVE_EXTRA"]
    report = work.parent / f"report-{platform}.json"
    ran = _run([str(python), "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report",
                str(report), f"{wheel}[{extra}]"], 1200, cwd=work, env=env)
    missing = re.search(r"No matching distribution found for (\S+)", ran.stderr)
    if ran.returncode != 0 and missing:
        pytest.skip(f"the package index here has no {missing.group(1)} (the {platform} image's jax build); "
                    "the dry run needs an index that does")
    assert ran.returncode == 0, ran.stderr[-4000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    want = {"cuda": "jax-cuda13-plugin", "tpu": "libtpu"}[platform]
    assert want in names and "jaxserve" in names, sorted(names)


# --- the CPU image, where docker runs ---------------------------------------------------------------


def _docker_daemon() -> str | None:
    """None when a docker daemon answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], 60)
    return None if info.returncode == 0 else f"no docker daemon: {info.stderr.strip()[-200:]}"


def test_cpu_image_builds_and_serves_the_demo_model():
    why = _docker_daemon()
    if why:
        pytest.skip(f"docker build of the CPU image skipped: {why}")
    tag = f"jaxserve-test:{os.getpid()}"
    built = _run(["docker", "build", "-t", tag, str(ROOT)], 3600)
    fetch_failed = re.search(r"failed to resolve source metadata|pull access denied|dial tcp|no such host",
                             built.stderr)
    if built.returncode != 0 and fetch_failed:
        pytest.skip(f"docker cannot fetch the base image here: {fetch_failed.group(0)}")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    port = _free_port()
    started = _run(["docker", "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:8000", tag], 120)
    assert started.returncode == 0, started.stderr
    container = started.stdout.strip()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert time.monotonic() < deadline, _run(["docker", "logs", container], 60).stdout[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hello", "max_tokens": 4},
                       timeout=120)
        assert r.status_code == 200, r.text
    finally:
        _run(["docker", "rm", "-f", container], 120)
        _run(["docker", "rmi", "-f", tag], 300)
