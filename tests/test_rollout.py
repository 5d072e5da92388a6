"""The rollout path: prompt transforms, G samples per prompt, texts and rewards in row order."""

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from tsched import model, rollout
from tsched.data import pipeline
from tsched.data.tokenizer import train_tokenizer
from tsched.sampling.sampler import SamplingConfig
from tsched.verify.pool import Verdict


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rollout")
    cfg = ConfigDict(dict(run_dir=str(d / "run"), seed=0, data=dict(
        families="arith,sort", min_difficulty=1, max_difficulty=2, train_size=300, eval_size=40, data_dir="")))
    splits = pipeline.open_splits(cfg)
    tok = train_tokenizer(pipeline.corpus(splits["train"]), str(d / "tok.model"), 64)
    enc = pipeline.Encode(tok.path, prompt_len=24, solution_len=48)
    return tok, next(iter(pipeline.train_batches(splits["train"], enc, 6, seed=0)))


def test_reference_prefix_moves_round_r_L_solution_tokens_into_the_prompt(setup):
    tok, b = setup
    for r in (0.0, 0.3, 0.99):
        out = rollout.PROMPT_TRANSFORMS["reference_prefix"](b, r, tok.pad_id, tok.eos_id)
        assert out["prompt"].shape == (6, 24 + 48)
        for i in range(6):
            sol = list(b["target"][i, : b["target_len"][i]])
            L = len(sol) - (sol[-1] == tok.eos_id)
            k = min(int(np.floor(r * L + 0.5)), L - 1)
            assert out["prefix_len"][i] == k
            n = out["prompt_len"][i]
            prompt = list(b["prompt"][i, 24 - b["prompt_len"][i]:])
            assert list(out["prompt"][i, -n:]) == prompt + sol[:k]
            assert np.all(out["prompt"][i, :-n] == tok.pad_id)
    # r = 0 leaves the prompt itself unchanged (only the static padding grows)
    out = rollout.PROMPT_TRANSFORMS["reference_prefix"](b, 0.0, tok.pad_id, tok.eos_id)
    assert np.array_equal(out["prompt"][:, 48:], b["prompt"])


class RecordingPool:
    """Scores a text 1 if it ends with its answer; records what it was asked."""

    def __init__(self):
        self.calls = []

    def score(self, texts, answers, verifiers):
        self.calls.append((texts, answers, verifiers))
        return [Verdict(float(t.endswith(a)), "ok") for t, a in zip(texts, answers)]


@pytest.mark.parametrize("transform,r", [("none", 0.0), ("reference_prefix", 0.6)])
def test_generate_scores_every_row_against_its_prompts_answer(setup, transform, r):
    tok, b = setup
    mcfg = model.ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                             head_dim=8, ffn_dim=32)
    params = model.init_params(mcfg, jax.random.key(0))
    G = 3
    scfg = SamplingConfig(max_new_tokens=6, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=1.0, num_samples=G)
    pool = RecordingPool()
    ro = rollout.generate(mcfg, scfg, params, b, jax.random.key(1), tok, pool, transform, r)
    texts, answers, verifiers = pool.calls[0]
    assert len(texts) == 6 * G and ro.texts == texts
    assert answers == [a for a in b["answer"] for _ in range(G)] and verifiers == [v for v in b["verifier"] for _ in range(G)]
    tokens, lengths = np.asarray(ro.tokens), np.asarray(ro.lengths)
    transformed = rollout.PROMPT_TRANSFORMS[transform](b, r, tok.pad_id, tok.eos_id)
    for i in range(6 * G):
        prefix = list(transformed["prefix"][i // G, : transformed["prefix_len"][i // G]]) if "prefix" in transformed else []
        assert texts[i] == tok.decode(prefix + list(tokens[i, : lengths[i]]))
    assert (transform == "reference_prefix") == (np.sum(transformed.get("prefix_len", 0)) > 0)
    np.testing.assert_array_equal(ro.rewards, [float(t.endswith(a)) for t, a in zip(texts, answers)])
    batch = ro.learner_batch()
    assert batch["prompts"].shape == transformed["prompt"].shape and batch["sample_logp"].shape == (6 * G, 6)
