"""examples/quickstart.ipynb runs top to bottom in a fresh Jupyter kernel, headless, and draws its
pictures. The kernel is this interpreter importing this glowflow, whatever kernels are installed."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="running the notebook needs nbformat (the notebook extra)")
nbclient = pytest.importorskip("nbclient", reason="running the notebook needs nbclient (the notebook extra)")
pytest.importorskip("ipykernel", reason="running the notebook needs ipykernel (the notebook extra)")

import glowflow  # noqa: E402

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
KERNEL = "glowflow-test"
WIDGET = "application/vnd.jupyter.widget-view+json"


def _kernel_spec(root: Path) -> None:
    """A kernel spec under ``root`` that starts this interpreter with this glowflow first on its path
    (the kernel named python3 may be another Python's)."""
    package_root = str(Path(glowflow.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    folder = root / "kernels" / KERNEL
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "glowflow test", "language": "python", "env": {"PYTHONPATH": path},
    }))


def _text(output) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return "\n".join(output.traceback)
    return str(output.get("data", {}).get("text/plain", ""))


def test_the_quickstart_notebook_runs_and_draws(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    _kernel_spec(tmp_path / "jupyter")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    probe = "import sys, glowflow; print('KERNEL', sys.executable, glowflow.__file__)"
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # a cell that raises fails here, naming the cell and its traceback

    code = [c for c in nb.cells if c.cell_type == "code"]
    # the kernel may send one print as several stream messages ('KERNEL', ' /path ...'): join them
    kernel_line = "".join(o.text for o in code[-1].outputs if o.output_type == "stream")
    assert kernel_line == f"KERNEL {sys.executable} {glowflow.__file__}\n"
    outputs = [o for c in code[:-1] for o in c.outputs]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 3  # temperatures, the scored images, the edits
    text = "\n".join(_text(o) for o in outputs)
    assert "Warning" not in text and "IProgress" not in text
    # the score's progress: a widget where ipywidgets is installed, else tqdm's text bar (not log lines)
    assert any(WIDGET in o.get("data", {}) for o in outputs) or re.search(r"score: .*\d+/\d+ \[", text)
