"""colab/ notebooks run top to bottom in a headless kernel, with tiny parameters injected."""

import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def run_notebook(path, parameters: str):
    """Executes the notebook with `parameters` as a cell after its `parameters` cell (as papermill does),
    from the repository root -> the executed notebook. Fails on the first cell that raises."""
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path}: expected one cell tagged 'parameters'"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(parameters))
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=1200,
                            resources={"metadata": {"path": ROOT}}).execute()
    return nb


def test_quickstart_runs_grpo_and_tp_schedule(tmp_path):
    nb = run_notebook(os.path.join(ROOT, "colab", "quickstart.ipynb"), f"""
OVERRIDES = {{**OVERRIDES, "rl.steps": 2, "sft.steps": 4, "eval.num_problems": 20, "train.progress": False}}
RUN_ROOT = {str(tmp_path)!r}
""")
    for strategy in ("uniform", "tp"):
        assert os.path.exists(tmp_path / strategy / "summary.json")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # both curves.png shown
    table = [o["data"]["text/markdown"] for o in outputs if "| method |" in o.get("data", {}).get("text/markdown", "")]
    assert len(table) == 1 and "| GRPO |" in table[0] and "| TP-Schedule |" in table[0]
