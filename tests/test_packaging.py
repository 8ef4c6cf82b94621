"""An installed wheel carries what the code reads at run time: the DeepSpeed and accelerate configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_the_configs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("glmtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind, suffix in (("deepspeed", "json"), ("accelerate", "yaml")):
        shipped = {p.name for p in (ROOT / "glmtune" / "configs" / kind).glob(f"*.{suffix}")}
        assert shipped and {f"glmtune/configs/{kind}/{n}" for n in shipped} <= names
    # the repository's configs/ is the same folder, so the documented paths and the package agree
    assert (ROOT / "configs").resolve() == (ROOT / "glmtune" / "configs").resolve()


def test_the_code_reads_the_package_configs():
    from glmtune.distributed import DEEPSPEED_CONFIGS

    assert DEEPSPEED_CONFIGS == ROOT / "glmtune" / "configs" / "deepspeed"
    assert (DEEPSPEED_CONFIGS / "zero3_offload.json").is_file()
