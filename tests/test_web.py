"""The front-end's JavaScript: its unit tests (node's built-in runner, tests/js/) pass and every file parses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js is not installed (apt install nodejs); the JS tests need it")


@needs_node
def test_javascript_unit_tests_pass() -> None:
    done = subprocess.run([NODE, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout and "# pass 0" not in done.stdout


@needs_node
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "web").glob("*.js")))
def test_front_end_scripts_parse(script: str, tmp_path: Path) -> None:
    """As ES modules, as ComfyUI loads them (a .mjs copy: node --check reads a .js file as CommonJS and passes it)."""
    module = tmp_path / (Path(script).stem + ".mjs")
    module.write_text((ROOT / "web" / script).read_text())
    done = subprocess.run([NODE, "--check", str(module)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
