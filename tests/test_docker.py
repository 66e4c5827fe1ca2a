"""The GPU image and its Makefile targets, checked without a Docker engine: what the Dockerfile says,
what .dockerignore keeps out, and the docker commands `make -n` renders (a dry run: nothing runs)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "gpt2-pipeline"
# The CUDA build of each locked torch on PyPI (Linux x86_64); the base image must match it.
TORCH_CUDA = {"2.13.0": "13.0"}
# What the Makefile reads from the environment (VENV, SKIP_SETUP, HF_TOKEN, the git identity) or from an
# outer make's command line (through MAKEFLAGS): cleared so the caller cannot change what these tests render.
MAKE_ENV_VARS = ["MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VENV", "SKIP_SETUP", "PYTHON", "DOCKER", "IMAGE", "VERSION",
                 "GIT_SHA", "TAG", "CACHE_VOLUME", "DOCKER_USER", "GPU_FLAGS", "GPUS", "EXP", "RECIPE", "HF_TOKEN",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "GPU_LOCK_DIR",
                 "INFINIBAND", "NODES", "NODE_RANK", "RDZV_ENDPOINT"]
# The per-GPU locks' folder of a run on the bare host (pipeline.core.device.gpu_lock_dir, TMPDIR unset)
HOST_GPU_LOCKS = "/tmp/gpt2-pipeline-gpus"


# --- the Dockerfile ---------------------------------------------------------------------------------

def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    result, current = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not current):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
        current = ""
    assert not current, f"{path.name} ends inside a continued line: {current!r}"
    return result


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def env_of() -> dict[str, str]:
    env = {}
    for args in args_of("ENV"):
        env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def words(args: str) -> list[str]:
    """An instruction's arguments, exec (JSON) form or shell form, without its --flags."""
    parts = json.loads(args) if args.startswith("[") else shlex.split(args)
    return [p for p in parts if not p.startswith("--")]


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def base_images() -> list[str]:
    """The FROM images, a ${BUILD_ARG} read as its default (the ARG line before the FROM)."""
    defaults = dict(args.split("=", 1) for args in args_of("ARG") if "=" in args)
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), words(args)[0])
            for args in args_of("FROM")]


def test_the_base_image_is_pinned_to_an_exact_tag_that_matches_the_locked_torch():
    for image in base_images():
        assert "$" not in image, f"FROM {image}: a build argument without a default"
        last = image.split("@")[0].split("/")[-1]
        tag = last.partition(":")[2]
        assert "@sha256:" in image or tag, f"FROM {image}: no tag, so it floats with whatever 'latest' is"
        assert tag != "latest", f"FROM {image}: 'latest' is not a pin"
        assert "@sha256:" in image or re.search(r"\d+\.\d+\.\d+", tag), f"FROM {image}: tag is not an exact version"
    base = base_images()[-1]
    cuda = re.match(r"nvidia/cuda:(\d+\.\d+)\.\d+-base-", base)
    assert cuda, f"the base is {base}; expected the CUDA 'base' flavour (torch brings its own CUDA libraries)"
    torch = lock_pins()["torch"]
    assert TORCH_CUDA.get(torch) == cuda.group(1), (
        f"requirements.lock pins torch=={torch} (CUDA {TORCH_CUDA.get(torch, '?')} on PyPI) but the base image "
        f"is CUDA {cuda.group(1)}: move both together and update TORCH_CUDA here")


def test_every_copy_source_exists_and_is_in_the_build_context():
    copies = args_of("COPY")
    assert copies, "no COPY in the Dockerfile"
    for args in copies:
        assert "--from" not in args, f"COPY {args}: no multi-stage build is expected"
        *sources, _dest = words(args)
        assert sources, f"COPY {args}: no source"
        for source in sources:
            matches = list(ROOT.glob(source.rstrip("/")))
            assert matches, f"COPY {args}: {source} does not exist in the repository"
            for match in matches:
                rel = match.relative_to(ROOT).as_posix()
                assert not dockerignored(rel), f"COPY {args}: {rel} is excluded by .dockerignore"


def test_dependencies_are_installed_from_the_lock_before_the_source_is_copied():
    steps = instructions()
    lock_copy = next(i for i, (kw, a) in enumerate(steps) if kw == "COPY" and "requirements.lock" in a)
    install = next((i for i, (kw, a) in enumerate(steps) if kw == "RUN" and "pip install" in a), None)
    assert install is not None, "no RUN pip install in the Dockerfile"
    run = steps[install][1]
    assert re.search(r"pip install .*-r requirements\.lock", run), f"the install does not use requirements.lock: {run}"
    assert lock_copy < install, "requirements.lock must be copied before the pip install that reads it"
    source_copy = next(i for i, (kw, a) in enumerate(steps) if kw == "COPY" and "pipeline" in a)
    assert install < source_copy, "the source is copied before the dependencies: every edit would reinstall torch"
    for kw, args in steps:
        if kw == "RUN" and "pip install" in args:
            assert not re.search(r"\btorch\b", args.replace("requirements.lock", "")), f"a second torch: {args}"
    assert "torch" in lock_pins() and "dvc" in lock_pins()


def test_the_image_runs_as_a_non_root_user_with_a_writable_home_and_cache():
    users = args_of("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"the final USER is {users[-1]}, i.e. root"
    env = env_of()
    for var in ("HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert var in env, f"ENV {var} is not set"
        made_writable = [path for run in args_of("RUN") for chmod in re.findall(r"chmod 1777((?: /\S+)+)", run)
                         for path in chmod.split()]
        assert env[var] in made_writable, (
            f"{var}={env[var]} is not made world-writable (chmod 1777): a --user uid could not write there")
    assert env.get("PYTHONUNBUFFERED") == "1"


def test_the_image_has_what_torch_compile_builds_with():
    """Triton builds its launcher with `cc` against Python.h; inductor's CPU kernels are C++."""
    installs = [words(run) for run in args_of("RUN") if "apt-get install" in run]
    assert installs, "no apt-get install in the Dockerfile"
    packages = set(installs[0])
    assert {"g++", "python3-dev"} <= packages, f"no C/C++ compiler or Python headers: {sorted(packages)}"
    assert "--no-install-recommends" in args_of("RUN")[0], "recommended packages would add hundreds of MB"


def test_the_default_command_is_dvc_from_the_lock_on_the_repos_pipeline():
    cmd = words(args_of("CMD")[-1])
    assert cmd == ["dvc", "repro"], cmd
    assert "dvc" in lock_pins(), "the image runs dvc but requirements.lock does not pin it"
    assert (ROOT / "dvc.yaml").is_file()
    assert args_of("WORKDIR")[-1] == "/repo"


# --- .dockerignore ----------------------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore pattern (Go filepath.Match plus **) as a regex; [classes] are not used here."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching pattern wins, and a
    pattern that matches a parent directory matches everything under it."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _pattern_regex(os.path.normpath(line.lstrip("!").strip("/")))
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


OUT_OF_THE_IMAGE = [".git/HEAD", ".venv/bin/python", "data/raw/dataset_dict.json", "data/input/corpus/a.txt",
                    "models/base/model.safetensors", "checkpoints/checkpoint-4/optimizer.pt", "dvclive/metrics.json",
                    ".dvc/cache/files/md5/ab/cdef", ".dvc/tmp/rwlock", ".demo/params.yaml", "outputs/samples.md",
                    "pipeline/__pycache__", "tests/__pycache__/conftest.cpython-312.pyc",
                    ".pytest_cache/v/cache/nodeids", ".ruff_cache/0.17.6/123"]
IN_THE_IMAGE = ["requirements.lock", "pipeline/train.py", "dvc.yaml", "params.yaml", ".dvc/config",
                ".dvc/plots/perplexity.json", "Makefile", "tests/fixtures/corpus"]


def test_dockerignore_keeps_data_models_and_caches_out_and_the_source_in():
    assert [path for path in OUT_OF_THE_IMAGE if not dockerignored(path)] == [], "let into the build context"
    assert [path for path in IN_THE_IMAGE if dockerignored(path)] == [], "dropped, though the image needs them"


# --- the Makefile's docker targets, as `make -n` renders them ---------------------------------------

def make(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    clean = {k: v for k, v in os.environ.items() if k not in MAKE_ENV_VARS}
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env={**clean, **(env or {})},
                            text=True, capture_output=True, timeout=60)
    if check:
        assert result.returncode == 0, f"make {' '.join(args)} failed:\n{result.stderr}"
    return result


def docker_line(output: str, subcommand: str, client: str = "docker") -> list[str]:
    lines = [line for line in output.splitlines() if line.startswith(f"{client} {subcommand} ")]
    assert len(lines) == 1, f"expected one `{client} {subcommand}` line in:\n{output}"
    return shlex.split(lines[0])


def version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def run_flags(argv: list[str]) -> list[str]:
    """The docker run options: everything between `run` and the image."""
    image = next(i for i, a in enumerate(argv) if a.startswith(f"{IMAGE}:"))
    return argv[2:image]


def test_docker_train_renders_gpus_mounts_user_torchrun_and_the_experiment():
    out = make("-n", "docker-train", "GPUS=2", "EXP=-S lr=5e-4").stdout
    argv = docker_line(out, "run")
    flags = run_flags(argv)
    assert "--gpus" in flags and flags[flags.index("--gpus") + 1] == "all"
    assert "--ipc=host" in flags
    env = env_of()
    assert f"{ROOT}:{args_of('WORKDIR')[-1]}" in flags, f"the repo is not mounted at the WORKDIR: {flags}"
    assert flags[flags.index("-w") + 1] == args_of("WORKDIR")[-1]
    volumes = [flags[i + 1] for i, flag in enumerate(flags) if flag == "-v" and not flags[i + 1].startswith("/")]
    assert len(volumes) == 1 and volumes[0].startswith("gpt2-pipeline-cache:"), f"not one named cache volume: {flags}"
    cache = volumes[0].split(":")[1]
    for var in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # kept from run to run
        assert Path(env[var]).is_relative_to(cache), f"{var}={env[var]} is not on the cache volume ({cache})"
    assert flags[flags.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert "NPROC_PER_NODE=2" in flags
    assert " ".join(argv).endswith(" dvc exp run -S lr=5e-4"), argv
    assert "docker build" in out, "docker-train does not build (or refresh) the image first"


def test_docker_train_runs_a_recipe_in_the_container():
    """RECIPE is checked and expanded by the image's Python (the host needs none), EXP's flags after it."""
    argv = docker_line(make("-n", "docker-train", "RECIPE=examples/gpu.yaml", "EXP=-S lr=5e-4").stdout, "run")
    image = next(i for i, a in enumerate(argv) if a.startswith(f"{IMAGE}:"))
    assert argv[image + 1:] == ["python", "-m", "pipeline.tools.recipe", "examples/gpu.yaml", "--run",
                                "-S", "lr=5e-4"], argv
    assert (ROOT / "examples/gpu.yaml").exists()


def test_docker_train_across_hosts_runs_the_pipeline_on_node_0_and_the_train_stage_elsewhere():
    hosts = ("GPUS=8", "NODES=2", "RDZV_ENDPOINT=10.0.0.1:29400", "EXP=-S lr=1e-4")
    first = docker_line(make("-n", "docker-train", *hosts, "NODE_RANK=0").stdout, "run")
    other = docker_line(make("-n", "docker-train", *hosts, "NODE_RANK=1", "NODE_ADDR=10.0.0.2").stdout, "run")
    for argv in first, other:
        assert {"--network", "NNODES=2", "RDZV_ENDPOINT=10.0.0.1:29400", "NPROC_PER_NODE=8"} <= set(argv), argv
    assert "NODE_RANK=0" in first and " ".join(first).endswith(" dvc exp run -S lr=1e-4")
    assert "NODE_RANK=1" in other and "NODE_ADDR=10.0.0.2" in other and other[-3:] == ["python", "-m", "pipeline.train"]
    missing = make("-n", "docker-train", "NODES=2", check=False)
    assert missing.returncode != 0 and "NODES=2 needs RDZV_ENDPOINT=host:port" in missing.stderr


def test_infiniband_devices_and_memlock_are_passed_across_hosts_where_the_host_has_them():
    hosts = ("GPUS=8", "NODES=2", "RDZV_ENDPOINT=10.0.0.1:29400")
    infiniband = ["--device", "/dev/infiniband", "--ulimit", "memlock=-1:-1", "--cap-add", "IPC_LOCK"]
    argv = docker_line(make("-n", "docker-train", *hosts, "INFINIBAND=/dev/infiniband").stdout, "run")
    flags = run_flags(argv)
    assert any(flags[i:i + 6] == infiniband for i in range(len(flags))), flags
    without = run_flags(docker_line(make("-n", "docker-train", *hosts, "INFINIBAND=").stdout, "run"))
    one_host = run_flags(docker_line(make("-n", "docker-train", "INFINIBAND=/dev/infiniband").stdout, "run"))
    assert "/dev/infiniband" not in without + one_host and "IPC_LOCK" not in without + one_host
    if not Path("/dev/infiniband").exists():  # what the Makefile finds by itself on this machine: none
        assert "/dev/infiniband" not in docker_line(make("-n", "docker-train", *hosts).stdout, "run")


def test_every_container_claims_gpus_in_one_shared_host_folder(tmp_path):
    """The per-GPU locks (pipeline.core.device.claim_gpus) must be the same files in every container and
    on the bare host, whoever runs them: one host folder, world-writable and sticky, mounted at its own
    path, and named to the pipeline."""
    for target in ("docker-train", "docker-test", "docker-demo", "docker-shell"):
        out = make("-n", target).stdout
        flags = run_flags(docker_line(out, "run"))
        assert f"{HOST_GPU_LOCKS}:{HOST_GPU_LOCKS}" in flags and f"GPU_LOCK_DIR={HOST_GPU_LOCKS}" in flags, flags
        made = [line for line in out.splitlines() if HOST_GPU_LOCKS in line and " run " not in line]
        assert made and out.index(made[0]) < out.index("docker run"), f"the host folder is not made first:\n{out}"
    mkdir = next(line for line in make("-n", "docker-train", f"GPU_LOCK_DIR={tmp_path}/gpus").stdout.splitlines()
                 if f"{tmp_path}/gpus" in line and " run " not in line)
    subprocess.run(["bash", "-c", f"umask 077 && {mkdir}"], check=True)
    assert oct((tmp_path / "gpus").stat().st_mode & 0o7777) == "0o1777"


def test_a_container_run_without_gpus_asks_for_the_cpu():
    """The stages refuse a CPU run where the CUDA image says there are GPUs (NVIDIA_VISIBLE_DEVICES) but
    none were given (pipeline.core.device); GPU_FLAGS= is asking for the CPU."""
    assert "PIPELINE_ALLOW_CPU=1" in docker_line(make("-n", "docker-demo", "GPU_FLAGS=").stdout, "run")
    assert "PIPELINE_ALLOW_CPU=1" in docker_line(make("-n", "docker-test", "GPU_FLAGS=").stdout, "run")
    assert "PIPELINE_ALLOW_CPU=1" not in docker_line(make("-n", "docker-train").stdout, "run")


def test_plain_docker_train_runs_dvc_repro_on_one_process():
    argv = docker_line(make("-n", "docker-train").stdout, "run")
    assert argv[-2:] == ["dvc", "repro"], argv
    assert "NPROC_PER_NODE=1" in argv


def test_docker_build_tags_the_image_with_the_version_and_the_git_sha():
    argv = docker_line(make("-n", "docker-build", "GIT_SHA=abc1234").stdout, "build")
    assert argv[argv.index("--tag") + 1] == f"{IMAGE}:{version()}-abc1234", argv
    assert argv[-1] == "." and "--build-arg" not in argv  # the Dockerfile's own pinned base
    # The environment does not change the tag (a CI's VERSION, say); only the command line does.
    tag = docker_line(make("-n", "docker-build", env={"VERSION": "9.9.9", "TAG": "x"}).stdout, "build")[3]
    assert tag.startswith(f"{IMAGE}:{version()}"), tag
    assert re.fullmatch(r"[\w][\w.-]{0,127}", tag.split(":", 1)[1]), f"not a valid docker tag: {tag}"


def test_the_base_is_a_build_argument_a_stand_in_can_replace():
    argv = docker_line(make("-n", "docker-build", "BASE_IMAGE=localhost/stand-in:bookworm").stdout, "build")
    assert argv[argv.index("--build-arg") + 1] == "BASE_IMAGE=localhost/stand-in:bookworm", argv
    arg = next(args for args in args_of("ARG") if args.startswith("BASE_IMAGE="))
    assert instructions().index(("ARG", arg)) < instructions().index(("FROM", args_of("FROM")[0]))


def test_every_docker_target_runs_with_podman_and_gives_gpus_as_a_cdi_device():
    for target in ("docker-build", "docker-train", "docker-shell", "docker-test", "docker-demo"):
        out = make("-n", target, "DOCKER=podman").stdout
        assert not re.search(r"^docker ", out, re.M), out
        assert re.search(r"^podman build --tag ", out, re.M), out
    run = make("-n", "docker-train", "DOCKER=podman").stdout
    argv = docker_line(run, "run", "podman")
    assert "--gpus" not in argv and argv[argv.index("--device") + 1] == "nvidia.com/gpu=all", argv
    docker = run_flags(docker_line(make("-n", "docker-train").stdout, "run"))
    assert [f for f in run_flags(argv) if f not in ("--device", "nvidia.com/gpu=all", "--userns=keep-id")] == \
        [f for f in docker if f not in ("--gpus", "all")]  # otherwise the same flags (keep-id: rootless, below)
    assert "--device" not in docker_line(make("-n", "docker-demo", "DOCKER=podman", "GPU_FLAGS=").stdout, "run",
                                         "podman")


def test_rootless_podman_keeps_your_uid_for_the_mounted_repo(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "id").write_text("#!/bin/sh\necho 1000\n")  # make asks `id -u` (and -g) who runs it
    (fake / "id").chmod(0o755)
    rootless = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    argv = docker_line(make("-n", "docker-train", "DOCKER=podman", env=rootless).stdout, "run", "podman")
    assert "--userns=keep-id" in argv and argv[argv.index("--user") + 1] == "1000:1000", argv
    assert "--userns=keep-id" not in docker_line(make("-n", "docker-train", env=rootless).stdout, "run")
    if os.getuid() == 0:  # rootful podman has no keep-id
        assert "--userns=keep-id" not in docker_line(make("-n", "docker-train", "DOCKER=podman").stdout, "run",
                                                     "podman")


@pytest.mark.skipif(shutil.which("podman") is None, reason="no podman")
@pytest.mark.parametrize("target", [("docker-test",), ("docker-train", "NODES=2", "RDZV_ENDPOINT=10.0.0.1:29400",
                                                       "INFINIBAND=/dev/infiniband")])
def test_podman_accepts_the_rendered_flags(target):
    """podman parses every flag of the run line before it looks for the image: a missing image must be
    what stops it."""
    out = make("-n", *target, "DOCKER=podman", "GPU_FLAGS=", "IMAGE=localhost/no-such-image").stdout
    argv = docker_line(out, "run", "podman")
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "docker/containers.conf")}
    with tempfile.TemporaryDirectory(prefix="podman-", dir="/tmp") as scratch:  # podman: a runroot < 50 chars
        # a storage of its own (vfs: no mounts left behind), not the machine's
        storage = ["--root", f"{scratch}/storage", "--runroot", f"{scratch}/run", "--storage-driver", "vfs"]
        result = subprocess.run([argv[0], *storage, *argv[1:]], text=True, capture_output=True, timeout=60,
                                stdin=subprocess.DEVNULL, env=env)
    assert result.returncode != 0
    assert "no-such-image" in result.stderr and "unknown flag" not in result.stderr, result.stderr


def test_docker_test_and_shell_share_the_train_flags():
    train = run_flags(docker_line(make("-n", "docker-train").stdout, "run"))
    test = docker_line(make("-n", "docker-test").stdout, "run")
    shell = docker_line(make("-n", "docker-shell").stdout, "run")
    assert test[-2:] == ["make", "test"], test
    assert run_flags(test) == train
    assert shell[-1] == "bash" and run_flags(shell) == train + ["-it"], shell


@pytest.mark.parametrize("name", ["HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"])
def test_tokens_and_remote_keys_are_passed_by_name_only_when_set(name):
    secret = "not_a_real_secret_123"
    out = make("-n", "docker-train", env={name: secret}).stdout
    argv = docker_line(out, "run")
    assert argv[argv.index(name) - 1] == "-e", argv
    assert secret not in out, "the value is on the command line"
    assert name not in make("-n", "docker-train").stdout


def test_the_host_git_identity_is_passed_for_dvc_exp_run():
    argv = docker_line(make("-n", "docker-train", env={"GIT_AUTHOR_NAME": "A. Tester",
                                                       "GIT_AUTHOR_EMAIL": "a@example.org"}).stdout, "run")
    assert {"GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL"} <= set(argv), argv
    assert "A. Tester" not in argv


@pytest.mark.parametrize("gpus", ["0", "abc", "-1", "01", "1.5", "", "1 2"])
def test_a_bad_gpus_stops_make_with_a_clear_message(gpus):
    result = make("-n", "docker-train", f"GPUS={gpus}", check=False)
    assert result.returncode != 0
    assert "GPUS must be a whole number >= 1" in result.stderr and f"got '{gpus}'" in result.stderr, result.stderr
    assert "docker" not in result.stdout


def test_docker_targets_never_set_up_the_local_venv(tmp_path):
    for target in ("docker-build", "docker-train", "docker-shell", "docker-test", "docker-demo"):
        out = make("-n", target, f"VENV={tmp_path / 'venv'}").stdout
        assert "venv" not in out and "pip install" not in out, out


def test_make_test_skips_setup_in_the_image_but_not_on_a_fresh_machine(tmp_path):
    fresh = make("-n", "test", f"VENV={tmp_path / 'fresh'}").stdout
    assert f"-m venv {tmp_path / 'fresh'}" in fresh and "pip install --quiet -r requirements.lock" in fresh
    venv = tmp_path / "image-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").symlink_to(shutil.which("python3") or "/usr/bin/python3")
    image = make("-n", "test", env={"VENV": str(venv), "SKIP_SETUP": "1"}).stdout
    assert "-m venv" not in image and "pip install" not in image, image
    assert f"{venv}/bin/hadolint Dockerfile" in image and f"{venv}/bin/python -m pytest" in image
    missing = make("lint", env={"VENV": str(tmp_path / "nope"), "SKIP_SETUP": "1"}, check=False)
    assert missing.returncode != 0 and "SKIP_SETUP=1 but" in missing.stderr, missing.stderr


def test_make_help_lists_the_docker_targets():
    out = make("help").stdout
    for target in ("setup", "demo", "test", "lint", "publish", "docker-build", "docker-train", "docker-shell",
                   "docker-test", "docker-demo", "docker-check"):
        assert re.search(rf"^  {target}\s+\S", out, re.M), f"make help does not list {target}:\n{out}"


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_the_docker_client_accepts_the_rendered_flags(tmp_path):
    """The real docker CLI parses every flag before it needs an engine: pointed at a socket that does not
    exist, it must get as far as 'Cannot connect'."""
    for target in ("docker-train", "docker-test"):  # docker-shell's are these plus -it, which wants a terminal
        argv = docker_line(make("-n", target, "GPUS=2", "EXP=-S lr=5e-4").stdout, "run")
        env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "DOCKER_CONFIG": str(tmp_path)}
        result = subprocess.run(argv, env=env, text=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert result.returncode != 0
        assert "Cannot connect to the Docker daemon" in result.stderr, result.stderr


# --- make docker-check's refusals (the check itself runs in CI: .ci/run) -----------------------------

def docker_check(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "docker/check.sh")], cwd=ROOT, text=True, capture_output=True,
                          timeout=60, env={**os.environ, "TAG": "0.0.0-test", **env})


def test_docker_check_refuses_in_one_line_when_a_tool_is_missing():
    result = docker_check(DOCKER="no-such-container-tool")
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.splitlines() == ["error: docker-check: no-such-container-tool is not installed; on Debian "
                                          "or Ubuntu: apt-get install podman debootstrap runc"], result.stderr


@pytest.mark.skipif(shutil.which("podman") is None or shutil.which("debootstrap") is None or os.getuid() != 0,
                    reason="needs podman, debootstrap and root")
def test_docker_check_refuses_in_one_line_when_the_disk_is_too_small():
    result = docker_check(DOCKER="podman", CHECK_DISK_GB="1000000")
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "GB free and the check needs 1000000 GB" in lines[0], result.stderr
