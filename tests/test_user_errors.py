"""Bad input met while a step runs: a clear message, exit status 2, no traceback, nothing committed."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import EXAMPLES


def test_a_broken_dataset_file_is_a_clear_error(tmp_path):
    shutil.copytree(EXAMPLES / "data", tmp_path / "data")
    (tmp_path / "data" / "broken.json").write_text('[{"instruction": "hi", ', encoding="utf-8")
    (tmp_path / "spec.yaml").write_text(
        f"model: {{model_name_or_path: {EXAMPLES / 'models' / 'tiny-llama'}}}\n"
        "data: {dataset: broken.json, dataset_dir: data}\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "tunepipe.cli", "run", "spec.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "broken.json: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    cache = tmp_path / ".tunepipe" / "cache"
    assert not [p for p in cache.glob("??/*") if p.is_dir()]  # nothing committed
