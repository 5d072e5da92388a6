"""The metrics log: a resumed phase keeps exactly the history of the final parameters; object stores
get whole rewrites at flush instead of appends."""

import json

from tsched.train import metrics


def rows(path):
    return [json.loads(ln) for ln in open(path) if ln.strip()]


def test_resume_drops_the_lines_after_the_checkpoint_of_that_phase(tmp_path):
    w = metrics.MetricsWriter(tmp_path)
    w.resume("sft", 0)
    w.write(1, {"sft_loss": 1.0}, phase="sft")
    for step in range(1, 6):
        w.write(step, {"reward": step / 10})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"phase": "rl", "st')  # a line a kill cut in half
    w = metrics.MetricsWriter(tmp_path)
    w.resume("rl", 3)
    w.write(4, {"reward": 0.0})
    w.close()
    assert [(r["phase"], r["step"]) for r in rows(tmp_path / "metrics.jsonl")] == [("sft", 1), ("rl", 1), ("rl", 2),
                                                                                   ("rl", 3), ("rl", 4)]


def test_object_store_paths_are_rewritten_at_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "is_local", lambda path: False)  # as for gs://: no append
    w = metrics.MetricsWriter(tmp_path)
    w.resume("rl", 0)
    w.write(1, {"reward": 0.5})
    w.write(2, {"reward": 0.25})
    assert rows(tmp_path / "metrics.jsonl") == []  # nothing appended per line
    w.flush()
    assert [r["reward"] for r in rows(tmp_path / "metrics.jsonl")] == [0.5, 0.25]
    w.write(3, {"reward": 1.0})
    w.close()
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    metrics.plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
