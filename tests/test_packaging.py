"""An installed wheel (not the source tree) finds every template and data file it needs."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_ships_slurm_assets(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    expected = sorted(p.relative_to(REPO / "slurm").as_posix()
                      for p in (REPO / "slurm").rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts)
    assert expected, "slurm/ has no templates or profiles"
    probe = ("import hpcllm, importlib.resources as r, pathlib, json;"
             "root = r.files('hpcllm.slurm_assets');"
             "print(json.dumps([hpcllm.__file__] + sorted(str(p.relative_to(pathlib.Path(str(root))))"
             " for p in pathlib.Path(str(root)).rglob('*') if p.is_file() and p.suffix != '.pyc' and '__pycache__' not in p.parts)))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, check=True).stdout
    import json
    files = json.loads(out)
    assert files[0].startswith(str(target)), "imported hpcllm from the source tree, not the wheel"
    assert files[1:] == expected
