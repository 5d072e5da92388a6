"""TFDS builder (array_record, no TensorFlow) read through grain: layout, shuffling, resumable iterator."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from tsched.data import pipeline, tfds_builder
from tsched.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    cfg = ConfigDict(dict(run_dir=str(d), seed=0, data=dict(
        families="arith,sort", min_difficulty=1, max_difficulty=2, train_size=300, eval_size=40, data_dir="")))
    splits = pipeline.open_splits(cfg)
    tok = train_tokenizer(pipeline.corpus(splits["train"]), str(d / "tok.model"), 64)
    return cfg, splits, tok


def test_tfds_splits(setup):
    cfg, splits, _ = setup
    assert len(splits["train"]) == 300 and len(splits["eval"]) == 40
    rec = tfds_builder.decode(splits["eval"][0])
    assert set(rec) == {"family", "problem", "solution", "answer", "verifier", "difficulty"}
    assert isinstance(rec["problem"], str) and rec["solution"].endswith(rec["answer"])
    train = {tfds_builder.decode(splits["train"][i])["problem"] for i in range(300)}
    assert not train & {tfds_builder.decode(splits["eval"][i])["problem"] for i in range(40)}


def test_layout_left_padded_prompt_right_padded_target(setup):
    _, splits, tok = setup
    enc = pipeline.Encode(tok.path, prompt_len=24, solution_len=48)
    b = next(iter(pipeline.train_batches(splits["train"], enc, 8, seed=0)))
    assert b["prompt"].shape == (8, 24) and b["target"].shape == (8, 48)
    for i in range(8):
        n, m = b["prompt_len"][i], b["target_len"][i]
        assert np.all(b["prompt"][i, : 24 - n] == tok.pad_id) and np.all(b["prompt"][i, 24 - n:] != tok.pad_id)
        if m < 48:  # not truncated: the solution ends with its answer, then EOS
            assert b["target"][i, m - 1] == tok.eos_id
            assert tok.decode(b["target"][i]).endswith(str(b["answer"][i]))


def test_shuffled_epochs_and_exact_resume(setup):
    _, splits, tok = setup
    enc = pipeline.Encode(tok.path, prompt_len=24)
    ds = pipeline.train_batches(splits["train"], enc, 10, seed=1)
    it = iter(ds)
    first = [next(it)["answer"].tolist() for _ in range(3)]
    state = it.get_state()
    expected = [next(it)["answer"].tolist() for _ in range(40)]  # crosses the epoch boundary at 30 batches
    resumed = iter(ds)
    resumed.set_state(state)
    assert [next(resumed)["answer"].tolist() for _ in range(40)] == expected
    epoch1 = sum(first + expected[:27], [])
    all_answers = [tfds_builder.decode(splits["train"][i])["answer"] for i in range(300)]
    assert sorted(epoch1) == sorted(all_answers)  # an epoch visits every example once
    assert expected[27] != first[0]  # and the next epoch is reshuffled
    other = iter(pipeline.train_batches(splits["train"], enc, 10, seed=2))
    assert next(other)["answer"].tolist() != first[0]


def test_eval_batches_are_static_and_mark_padding(setup):
    _, splits, tok = setup
    batches = pipeline.eval_batches(splits["eval"], pipeline.Encode(tok.path, 24), 40, 16)
    assert [b["prompt"].shape for b in batches] == [(16, 24)] * 3
    assert sum(b["valid"].sum() for b in batches) == 40
    assert list(batches[-1]["valid"]) == [True] * 8 + [False] * 8


def test_prompt_too_long_is_a_clear_error(setup):
    _, splits, tok = setup
    with pytest.raises(ValueError, match="data.prompt_len"):
        pipeline.Encode(tok.path, prompt_len=3).map(splits["train"][0])


def _build(args):
    data_dir, barrier = args
    barrier.wait()
    b = tfds_builder.build(tfds_builder.task_config("arith", 1, 2, 3000, 40, seed=7), data_dir)
    return [tfds_builder.decode(r)["problem"] for r in b.as_data_source(split="eval")]


def test_processes_building_the_same_dataset_at_once_all_get_it(tmp_path):
    """A sweep's parallel runs on one data_dir may all find the dataset missing and build it together: the
    builds race for the final directory, and the losers must use the winner's files (same examples)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            problems = pool.map(_build, [(str(tmp_path), barrier)] * 3)
    assert len(problems[0]) == 40 and problems[0] == problems[1] == problems[2]


def test_a_build_that_lost_the_race_uses_the_finished_dataset(tmp_path, monkeypatch):
    """The same race made certain: another builder finishes while this one is preparing, and tfds's final
    rename then fails."""
    config = tfds_builder.task_config("arith", 1, 2, 200, 20, seed=3)
    prepare = tfds_builder.TschedTasks.download_and_prepare

    def lose(self, *args, **kwargs):
        prepare(tfds_builder.TschedTasks(config=config, data_dir=str(tmp_path), file_format="array_record"))
        raise FileExistsError("Cannot rename ...incomplete...: destination already exists")

    monkeypatch.setattr(tfds_builder.TschedTasks, "download_and_prepare", lose)
    b = tfds_builder.build(config, str(tmp_path))
    assert b.is_prepared() and len(b.as_data_source(split="eval")) == 20
    monkeypatch.setattr(tfds_builder.TschedTasks, "download_and_prepare",
                        lambda self, *a, **k: (_ for _ in ()).throw(FileExistsError("x")))
    with pytest.raises(FileExistsError):  # nothing finished elsewhere: the error is real
        tfds_builder.build(tfds_builder.task_config("arith", 1, 2, 200, 20, seed=4), str(tmp_path))
