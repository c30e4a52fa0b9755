"""The pure core must stay import-light (design.md, layers): no ray, vllm, transformers or diffusers."""

import subprocess
import sys

import pytest

HEAVY = ("ray", "vllm", "transformers", "diffusers", "deepspeed")


@pytest.mark.parametrize("module", ["zray.losses", "zray.scores", "zray.metrics", "zray.config", "zray.data",
                                    "zray.types", "zray.checksum", "zray.sampling", "zray.losses.gdso"])
def test_core_module_imports_no_heavy_stack(module):
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


def test_nothing_imports_jobs():
    """jobs/ sits at the top: no library or actor module may import it."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    offenders = [
        str(path.relative_to(root))
        for folder in ("zray", "actors")
        for path in (root / folder).rglob("*.py")
        if any(line.lstrip().startswith(("import jobs", "from jobs")) for line in path.read_text().splitlines())
    ]
    assert offenders == []
