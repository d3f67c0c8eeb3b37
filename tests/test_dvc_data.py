"""The data-versioning flow the README promises, with the real dvc CLI in a temp git repo."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.core.fileio import sha256_file

DVC = str(Path(sys.executable).with_name("dvc"))


def run(cmd, cwd):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out.stdout


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.skipif(not Path(DVC).exists(), reason="dvc is installed into the project venv by make")
def test_dvc_add_push_delete_pull_gives_identical_files(tmp_path):
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run([DVC, "init", "-q"], repo)
    run([DVC, "config", "core.analytics", "false"], repo)
    run([DVC, "remote", "add", "-d", "local", str(remote)], repo)

    raw = repo / "data" / "raw"
    rng = np.random.default_rng(0)
    for cls in ("C1", "C3"):
        (raw / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 64), dtype=np.uint8)).save(raw / cls / f"P{i}_{cls}.png")
    (raw / "manifest.csv").write_text("file,patient_id\nC1/P0_C1.png,P0\n")
    before = digest_tree(raw)

    run([DVC, "add", "data/raw"], repo)
    assert (repo / "data" / "raw.dvc").is_file()
    ignored = (repo / "data" / ".gitignore").read_text()
    assert "/raw" in ignored
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "data"], repo)
    run([DVC, "push"], repo)
    assert any(remote.rglob("*")), "nothing reached the remote"

    shutil.rmtree(raw)
    shutil.rmtree(repo / ".dvc" / "cache")
    run([DVC, "pull"], repo)
    assert digest_tree(raw) == before
