"""The install is part of the product: a second run is a no-op and Horovod is cached."""
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_second_install_does_not_rebuild():
    res = subprocess.run(["bash", "scripts/install.sh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stdout
    assert "building Horovod" not in res.stdout + res.stderr


def test_horovod_wheel_is_cached_for_fresh_clones():
    wheels = list((Path.home() / ".cache/hpcllm/wheels").glob("horovod-0.28.1-*/horovod-0.28.1-*.whl"))
    assert wheels, "no cached Horovod wheel: a fresh clone would rebuild it"

