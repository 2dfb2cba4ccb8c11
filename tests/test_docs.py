"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    scopes = []
    for block in blocks:
        scopes.append({})
        exec(compile(block, str(README), "exec"), scopes[-1])
    use, foreign, training, steering = scopes
    assert (tmp_path / "my_sae" / "cfg.json").is_file()
    assert use["x_hat"].shape == (512, 768)
    assert (tmp_path / "runs" / "synthetic" / "sae" / "cfg.json").is_file()
    assert training["recovery"] > 0.9
    assert (tmp_path / "sparsify_folder" / "sae.safetensors").is_file()
    assert foreign["back"].activation == "topk"
    assert steering["latents"].shape == (1, 5, 512)
    assert steering["steered"].shape == (1, 10)  # 5 prompt + 5 generated tokens
    assert not torch.allclose(steering["spliced"], steering["clean"])  # a random SAE's x_hat
