"""The container and CI files: Dockerfile conventions, hadolint, the CircleCI schema.

hadolint and check-jsonschema come with the ``test`` extra; where they are missing (e.g. when the
suite runs inside the image) those checks are skipped with the reason.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bids_ctp import __version__

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CIRCLECI = ROOT / ".circleci" / "config.yml"
pytestmark = pytest.mark.skipif(not DOCKERFILE.is_file(), reason="no source checkout beside the tests")


def _tool(name):
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def _instructions():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_conventions():
    lines = _instructions()
    stages = [line for line in lines if line.startswith("FROM ")]
    assert all(line.split()[1] == "debian:bookworm-slim" for line in stages)
    final = lines[lines.index(stages[-1]):]
    assert final[-1] == 'ENTRYPOINT ["bids_ctp"]'
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    env = " ".join(line for line in final if line.startswith("ENV "))
    assert "HOME=/tmp" in env and "TMPDIR=/tmp" in env and "MPLCONFIGDIR=/tmp/" in env
    labels = " ".join(line for line in final if line.startswith("LABEL "))
    for key in ("version", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'licenses="Apache-2.0"' in labels
    assert f"ARG VERSION={__version__}" in final  # the label's default follows the package
    # nothing from the build stage but the venv reaches the final image, and no compilers at all
    assert not re.search(r"\b(gcc|g\+\+|build-essential|python3-dev)\b", " ".join(lines))
    assert [line for line in final if line.startswith("COPY ")] == ["COPY --from=build /opt/venv /opt/venv"]


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for name in (".git", ".venv", "demo", "work", "tests"):
        assert name in ignored


def test_hadolint_clean():
    proc = subprocess.run([_tool("hadolint"), "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_circleci_config_schema():
    # the vendored schema ships with check-jsonschema: no network (a dead proxy proves it)
    env = dict(os.environ, HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.circle-ci", str(CIRCLECI)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_circleci_builds_tests_and_deploys_on_tags():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(CIRCLECI.read_text())
    jobs = config["jobs"]
    assert {"build", "test", "demo", "deploy"} <= set(jobs)
    text = CIRCLECI.read_text()
    assert "docker save" in text and "docker load" in text and "scripts/container-test.sh" in text
    assert "--read-only" in text and "store_artifacts" in text
    deploy = jobs["deploy"]["steps"][-1]["run"]["command"]
    assert "DOCKER_PASS" in deploy and ":latest" in deploy and ":$CIRCLE_TAG" in deploy
    (workflow,) = config["workflows"].values()
    entry = next(job["deploy"] for job in workflow["jobs"] if isinstance(job, dict) and "deploy" in job)
    assert entry["filters"]["branches"]["ignore"] == "/.*/" and entry["filters"]["tags"]["only"] == "/.*/"


def test_container_test_script():
    script = ROOT / "scripts" / "container-test.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)
    text = script.read_text()
    assert "--read-only" in text and ":/data:ro" in text and "! -uid" in text
    assert "container-test:" in (ROOT / "Makefile").read_text()
