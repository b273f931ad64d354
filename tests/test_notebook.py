"""examples/quickstart.ipynb runs top to bottom on CPU at small sizes (so it never rots)."""

import os
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(smollm2_gguf, monkeypatch):
    monkeypatch.setenv("ADORE_QUICKSTART_SMALL", "1")  # the notebook's first cell reads it
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    markdown = "\n".join(o["data"].get("text/markdown", "") for o in outputs if "data" in o)
    assert "full :" in text and "adore:" in text and "adore uses a" in text
    assert "| adore | " in markdown and "| streaming | " in markdown  # the perplexity table
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot
