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


def test_real_model_rl_eval_and_export_from_local_paths(tmp_path):
    """The fetch cell replaced by local paths: a tiny random Qwen3 checkpoint and JSONL problem sets."""
    from tests import hf_tiny

    small = {"rl.steps": 2, "rl.prompts_per_step": 2, "rl.group_size": 2, "rl.micro_batches": 1, "rl.max_new_tokens": 8,
             "data.prompt_len": 64, "data.max_solution_tokens": 24, "eval.num_problems": 4, "eval.batch_size": 4,
             "eval.samples": 2, "eval.pass_k": "1,2", "verify.num_workers": 1, "train.progress": False,
             "train.kl_metrics": False, "data.data_dir": str(tmp_path / "data")}
    nb = run_notebook(os.path.join(ROOT, "colab", "real_model.ipynb"), f"""
CHECKPOINT = {hf_tiny.checkpoint("qwen3", tmp_path / "qwen3")!r}
TRAIN_FILES = {str(hf_tiny.write_jsonl(tmp_path / "train.jsonl", hf_tiny.problems(32, 0)))!r}
EVAL_FILES = "tiny=" + {str(hf_tiny.write_jsonl(tmp_path / "eval.jsonl", hf_tiny.problems(4, 1)))!r}
RUN_DIR = {str(tmp_path / "run")!r}
OVERRIDES = {small!r}
""")
    assert os.path.exists(tmp_path / "run" / "hf" / "config.json")
    assert os.path.exists(tmp_path / "run" / "eval" / "eval.json")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("tiny" in o.get("data", {}).get("text/markdown", "") for o in outputs)  # the eval table
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("Qwen3ForCausalLM" in o.get("text", "") for o in outputs)  # transformers loaded the export
