"""The README's snippets run as written, and .ci/run runs the README's exact test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_quickstart_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python snippet"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md quickstart", "exec"), namespace)
    model, report = namespace["model"], namespace["report"]
    assert len(report.converted) == 14 and report.skipped == {"lm_head": "skip pattern 'lm_head' (recipe.skip)"}
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.fp8_scale.initialized.all()  # attach updated the scales during the 10 steps
    assert (q_proj.fp8_scale.amax_history[:, :10] > 0).all()


def test_fog_snippet_runs_as_written(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    fog = next(b for b in blocks if "FOGConfig" in b)
    monkeypatch.chdir(ROOT)  # the snippet reads recipes/models/ relative to the repository
    namespace: dict = {}
    exec(compile(fog, "README.md FOG snippet", "exec"), namespace)
    assert namespace["model"].config._attn_implementation == "hf_fp8"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
    main_job = next(c for c in commands if "hf-fp8 train" in c)
    assert main_job == "pip install torch==2.13.0 && pip install -e . && hf-fp8 train"
