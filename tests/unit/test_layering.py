"""The layers of docs/architecture.md, enforced: arrows point down only.

Rules (every `import` statement counts, at module level or inside a function):

1. `zray/` (the library) imports no `ray`, `vllm`, `actors` or `jobs`: Ray lives in actors/ and jobs/.
   One named exception: Ray Data's Parquet reader (`zray.data.parquet.read_ray_dataset`, imported lazily).
2. `actors/` imports no `jobs`.
3. No job imports another job: in `jobs/`, only the two dispatchers, the CLI (`jobs/cli.py`) and the pipeline
   (`jobs/run.py`, `zray run`), import `jobs.*`.
4. The pure core (`zray.{losses,sampling,scores,types,rubric,metrics,config,checksum}`) imports none of ray,
   vllm, transformers, diffusers, deepspeed, statically; and importing each of those modules (and `zray.data`)
   loads none of them (checked in a fresh interpreter, so transitive imports count too).

Each static rule is also run on a planted violation, so the checker is known to fail when it should.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "vllm", "transformers", "diffusers", "deepspeed")
PURE_CORE = ("zray/losses", "zray/sampling.py", "zray/scores.py", "zray/types.py", "zray/rubric.py",
             "zray/metrics.py", "zray/config.py", "zray/checksum.py")
DISPATCHERS = ("jobs/cli.py", "jobs/run.py")  # rule 3: the CLI and the pipeline run other jobs
ALLOWED = {("zray/data/parquet.py", "ray.data")}  # rule 1's exception: the Ray Data reader of our Parquet tables


def imported_modules(path: Path) -> list[str]:
    """Every module an `import` / `from ... import` in `path` names (absolute imports; relative ones resolved
    against the file's package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                package = list(path.parent.parts)
                base = package[:len(package) - (node.level - 1)]
                found.append(".".join([*base[-3:], node.module] if node.module else base[-3:]))
            elif node.module:
                found.append(node.module)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def violations(root: Path) -> list[str]:
    """'<file>: <rule>: <module>' for every import in the tree at `root` that breaks a rule above."""
    out = []
    for path in sorted(p for folder in ("zray", "actors", "jobs") for p in (root / folder).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        folder = rel.split("/")[0]
        for module in imported_modules(path):
            top = _top(module)
            if folder == "zray":
                if top in ("ray", "vllm", "actors", "jobs") and (rel, module) not in ALLOWED:
                    out.append(f"{rel}: rule 1 (the library imports no Ray, vLLM, actors or jobs): {module}")
                if rel.startswith(PURE_CORE) and top in HEAVY:
                    out.append(f"{rel}: rule 4 (the pure core imports no heavy stack): {module}")
            elif folder == "actors" and top == "jobs":
                out.append(f"{rel}: rule 2 (actors import no jobs): {module}")
            elif folder == "jobs" and top == "jobs" and rel not in DISPATCHERS:
                out.append(f"{rel}: rule 3 (no job imports another job; only {' and '.join(DISPATCHERS)} "
                           f"dispatch): {module}")
    return out


def test_the_tree_keeps_its_layers():
    assert violations(ROOT) == []


PLANTED = {
    "zray/tasks/bad.py": ("def f():\n    import ray\n", "rule 1"),
    "zray/models/bad.py": ("from actors.learner import fit\n", "rule 1"),
    "zray/evaluation/bad.py": ("from jobs import recipes\n", "rule 1"),
    "zray/training/bad.py": ("import vllm.sampling_params\n", "rule 1"),
    "actors/bad.py": ("from jobs.evaluate import run_evaluate\n", "rule 2"),
    "jobs/bad.py": ("def f():\n    from jobs.pretrain_vlm import run_pretrain_vlm\n", "rule 3"),
    "zray/losses/bad.py": ("import transformers\n", "rule 4"),
    "zray/scores.py": ("from diffusers import AutoencoderKL\n", "rule 4"),
}


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_each_rule_catches_a_planted_violation(tmp_path, planted):
    source, rule = PLANTED[planted]
    for rel in ("zray/ok.py", "actors/ok.py", "jobs/cli.py", "jobs/ok.py"):  # allowed imports of each layer
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "zray/ok.py").write_text("import torch\nfrom zray.data import read_table\n")
    (tmp_path / "actors/ok.py").write_text("import ray\nfrom zray.tasks.gdso import GDSOTask\n")
    (tmp_path / "jobs/cli.py").write_text("def main():\n    from jobs.evaluate import run_evaluate\n")
    (tmp_path / "jobs/ok.py").write_text("from actors.learner import fit\nfrom zray.config import RunConfig\n")
    assert violations(tmp_path) == []
    (tmp_path / planted).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / planted).write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{planted}: {rule} "), found


def test_the_ray_data_exception_is_narrow(tmp_path):
    (tmp_path / "zray/data").mkdir(parents=True)
    (tmp_path / "zray/data/parquet.py").write_text("def f():\n    import ray.data\n    import ray.train\n")
    assert violations(tmp_path) == ["zray/data/parquet.py: rule 1 (the library imports no Ray, vLLM, actors or "
                                    "jobs): ray.train"]


@pytest.mark.parametrize("module", ["zray.losses", "zray.scores", "zray.metrics", "zray.config", "zray.data",
                                    "zray.types", "zray.checksum", "zray.sampling", "zray.rubric",
                                    "zray.losses.gdso", "zray.losses.grpo", "zray.training.runs"])
def test_core_module_imports_no_heavy_stack(module):
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"
