"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    scopes = []
    for block in blocks:
        scopes.append({})
        exec(compile(block, str(README), "exec"), scopes[-1])
    use, training = scopes
    assert (tmp_path / "my_sae" / "cfg.json").is_file()
    assert use["x_hat"].shape == (512, 768)
    assert (tmp_path / "runs" / "synthetic" / "sae" / "cfg.json").is_file()
    assert training["recovery"] > 0.9
