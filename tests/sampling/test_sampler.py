"""Sampler: EOS handling, lengths, determinism, padding invariance, KV decode = full pass, filters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsched import model
from tsched.sampling import sampler
from tsched.sampling.sampler import SamplingConfig, filter_logits, sample

EOS, PAD = 3, 0
SLOW = pytest.mark.slow  # more cases of a test whose first case runs in the fast set


@pytest.fixture
def narrow_windows(monkeypatch):
    """Windows of any width, so that the tests' short budgets decode through several windows."""
    monkeypatch.setattr(sampler, "MIN_WINDOW", 1)


def test_windows_grow_to_the_budget_and_are_never_narrower_than_the_minimum():
    assert sampler._windows(128) == [32, 64, 96, 128]
    assert sampler._windows(100) == [34, 67, 100]
    assert sampler._windows(64) == [32, 64]
    assert sampler._windows(40) == [40]
    assert sampler._windows(1) == [1]


def prompts_batch(cfg, lens, P=8, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((len(lens), P), np.int32)
    for i, n in enumerate(lens):
        out[i, P - n:] = rng.integers(4, cfg.vocab_size, n)
    return jnp.asarray(out), jnp.asarray(lens, jnp.int32)


def test_eos_lengths_and_padding(tiny_model_cfg, tiny_params):
    prompts, lens = prompts_batch(tiny_model_cfg, [8, 3, 5, 1])
    scfg = SamplingConfig(max_new_tokens=40, eos_id=EOS, pad_id=PAD, temperature=1.5, num_samples=4)
    out = jax.device_get(sample(tiny_model_cfg, scfg, tiny_params, prompts, lens, jax.random.key(0)))
    assert out["tokens"].shape == (16, 40)
    saw_eos = False
    for row, n in zip(out["tokens"], out["lengths"]):
        eos = np.flatnonzero(row == EOS)
        if len(eos):
            saw_eos = True
            assert n == eos[0] + 1  # length counts the EOS
            assert np.all(row[n:] == PAD)
        else:
            assert n == 40
    assert saw_eos  # vocab 32 at temperature 1.5: some row stops early
    assert np.all(out["logp"][np.arange(40)[None] >= out["lengths"][:, None]] == 0)


def test_deterministic_for_a_key_and_different_across_keys(tiny_model_cfg, tiny_params):
    prompts, lens = prompts_batch(tiny_model_cfg, [4, 6])
    scfg = SamplingConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=1.0, num_samples=3)
    a = sample(tiny_model_cfg, scfg, tiny_params, prompts, lens, jax.random.key(5))
    b = sample(tiny_model_cfg, scfg, tiny_params, prompts, lens, jax.random.key(5))
    c = sample(tiny_model_cfg, scfg, tiny_params, prompts, lens, jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    assert not np.array_equal(np.asarray(a["tokens"]), np.asarray(c["tokens"]))
    # the G samples of one prompt differ from each other
    assert len({tuple(r) for r in np.asarray(a["tokens"])[:3]}) > 1


# windows of unequal and equal sizes, fewer steps than windows
@pytest.mark.parametrize("T", [7, *(pytest.param(T, marks=SLOW) for T in (16, 2, 1))])
def test_greedy_kv_decode_equals_full_forward_and_ignores_padding(tiny_model_cfg, tiny_params, narrow_windows, T):
    lens = [8, 2, 5]
    prompts, plens = prompts_batch(tiny_model_cfg, lens)
    scfg = SamplingConfig(max_new_tokens=T, eos_id=-1, pad_id=PAD, temperature=0.0)
    out = sample(tiny_model_cfg, scfg, tiny_params, prompts, plens, jax.random.key(0))
    full = jnp.concatenate([prompts, out["tokens"]], 1)
    valid = jnp.concatenate([jnp.arange(8)[None] >= 8 - plens[:, None], jnp.ones((3, T), bool)], 1)
    logits = model.forward(tiny_model_cfg, tiny_params, full, valid)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 7:-1], -1)), np.asarray(out["tokens"]))
    # each prompt alone, without any padding, gives the same continuation
    for i, n in enumerate(lens):
        alone = sample(tiny_model_cfg, scfg, tiny_params, prompts[i:i + 1, 8 - n:], plens[i:i + 1], jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(alone["tokens"][0]), np.asarray(out["tokens"][i]))


def ref_filter(logits, k, p):
    """Top-k, then top-p over what top-k kept (the order HF and vLLM apply them)."""
    out = logits.copy()
    for row in out:
        order = np.argsort(-row, kind="stable")
        if k:
            row[row < row[order[k - 1]]] = -np.inf
        if p < 1:
            probs = np.exp(row[order] - row[order].max())
            probs /= probs.sum()
            before = np.cumsum(probs) - probs
            row[row < row[order][before < p].min()] = -np.inf
    return out


@pytest.mark.parametrize("k,p", [(0, 0.9), (5, 1.0), (3, 0.5), (1, 1.0), (0, 0.01)])
def test_filters_against_numpy(k, p):
    logits = np.random.default_rng(k).normal(size=(4, 20)).astype(np.float32) * 3
    got = np.asarray(filter_logits(jnp.asarray(logits), k, p))
    np.testing.assert_array_equal(got, ref_filter(logits, k, p))


def test_top_k_one_is_greedy(tiny_model_cfg, tiny_params):
    prompts, lens = prompts_batch(tiny_model_cfg, [5, 7])
    g = sample(tiny_model_cfg, SamplingConfig(10, -1, PAD, temperature=0.0), tiny_params, prompts, lens, jax.random.key(1))
    k1 = sample(tiny_model_cfg, SamplingConfig(10, -1, PAD, temperature=1.0, top_k=1), tiny_params, prompts, lens,
                jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(g["tokens"]), np.asarray(k1["tokens"]))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_tokens_follow_the_tempered_distribution(tiny_model_cfg, tiny_params, temperature):
    """4096 first tokens of one prompt: their frequencies are softmax(logits / temperature), and far
    from the untempered softmax (total variation distance)."""
    params = {**tiny_params, "embedding": tiny_params["embedding"] * 10.0}  # logits with a spread of a few units
    prompts, lens = prompts_batch(tiny_model_cfg, [5])
    scfg = SamplingConfig(max_new_tokens=1, eos_id=-1, pad_id=PAD, temperature=temperature, num_samples=4096)
    out = sample(tiny_model_cfg, scfg, params, prompts, lens, jax.random.key(3))
    valid = jnp.arange(8)[None] >= 8 - lens[:, None]
    logits = np.asarray(model.forward(tiny_model_cfg, params, prompts, valid)[0, -1], np.float64)
    softmax = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    freq = np.bincount(np.asarray(out["tokens"])[:, 0], minlength=tiny_model_cfg.vocab_size) / 4096
    tv = lambda p: 0.5 * np.abs(freq - p).sum()
    assert tv(softmax(logits / temperature)) < 0.06
    assert tv(softmax(logits)) > tv(softmax(logits / temperature)) + 0.1


def test_a_set_of_stop_ids_ends_a_row_at_either_id(tiny_model_cfg, tiny_params):
    """Qwen-style checkpoints declare two end ids: a row stops at the first of either, the length counts
    it, padding follows; the same key with one of the ids alone gives the same tokens up to that stop."""
    prompts, lens = prompts_batch(tiny_model_cfg, [8, 3, 5, 1])
    stops = (EOS, 7)
    scfg = SamplingConfig(max_new_tokens=40, eos_id=stops, pad_id=PAD, temperature=1.5, num_samples=8)
    assert scfg.stop_ids == stops and SamplingConfig(4, EOS, PAD).stop_ids == (EOS,)
    out = jax.device_get(sample(tiny_model_cfg, scfg, tiny_params, prompts, lens, jax.random.key(0)))
    ended_by = set()
    for row, n in zip(out["tokens"], out["lengths"]):
        hits = np.flatnonzero(np.isin(row, stops))
        if len(hits):
            assert n == hits[0] + 1 and np.all(row[n:] == PAD)
            ended_by.add(int(row[hits[0]]))
        else:
            assert n == 40
    assert ended_by == set(stops)  # both ids ended some row
    one = jax.device_get(sample(tiny_model_cfg, SamplingConfig(40, EOS, PAD, temperature=1.5, num_samples=8),
                                tiny_params, prompts, lens, jax.random.key(0)))
    for a, b, n in zip(out["tokens"], one["tokens"], out["lengths"]):
        np.testing.assert_array_equal(a[:n], b[:n])


@pytest.mark.parametrize("top_p,kept", [(0.5, 1), (0.5001, 2), (0.75, 2), (0.875, 3), (0.9, 4), (1.0, 6)])
def test_top_p_boundary_with_exact_masses(top_p, kept):
    """Dyadic probabilities (exact in float32): a token is kept iff the mass strictly before it is < top_p,
    so a token whose preceding mass equals top_p exactly is dropped, and the top token is always kept."""
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125], np.float32)
    perm = np.array([3, 0, 5, 1, 4, 2])  # vocabulary order != probability order
    logits = np.log(probs)[perm][None]
    got = np.asarray(filter_logits(jnp.asarray(logits), 0, top_p))[0]
    want_kept = set(np.flatnonzero(np.isin(perm, np.arange(kept))))
    assert set(np.flatnonzero(np.isfinite(got))) == want_kept
    np.testing.assert_array_equal(got[list(want_kept)], logits[0, list(want_kept)])  # kept logits unchanged


def test_fresh_randomness_at_every_decode_step(tiny_model_cfg, tiny_params):
    """Zero embeddings give uniform next-token logits at every step: the tokens of a row are then i.i.d.
    uniform, so consecutive tokens agree with probability 1/V (a decode step that reused the previous
    step's key would repeat the row's first token forever)."""
    params = {**tiny_params, "embedding": jnp.zeros_like(tiny_params["embedding"])}
    prompts, lens = prompts_batch(tiny_model_cfg, [5, 3])
    scfg = SamplingConfig(max_new_tokens=8, eos_id=-1, pad_id=PAD, temperature=1.0, num_samples=64)
    toks = np.asarray(sample(tiny_model_cfg, scfg, params, prompts, lens, jax.random.key(2))["tokens"])
    same_as_previous = np.mean(toks[:, 1:] == toks[:, :-1])
    assert same_as_previous < 3 / tiny_model_cfg.vocab_size  # expected 1/32 over 896 pairs
    freq = np.bincount(toks.ravel(), minlength=tiny_model_cfg.vocab_size) / toks.size
    assert 0.5 * np.abs(freq - 1 / tiny_model_cfg.vocab_size).sum() < 0.15  # uniform (sampling noise ~0.07)


def test_shared_prompt_cache_equals_repeated_prompts(tiny_model_cfg, tiny_params):
    """G samples over one shared prompt cache = the same prompts repeated G times with one sample each
    (each row its own prompt cache): rows keep their ids, hence their keys, so tokens are equal and
    log-probs equal to float tolerance (the two attend with differently shaped contractions)."""
    prompts, lens = prompts_batch(tiny_model_cfg, [8, 3, 5, 1])
    G = 4
    shared = SamplingConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=1.5, num_samples=G)
    a = jax.device_get(sample(tiny_model_cfg, shared, tiny_params, prompts, lens, jax.random.key(4)))
    b = jax.device_get(sample(tiny_model_cfg, dataclasses.replace(shared, num_samples=1), tiny_params,
                              jnp.repeat(prompts, G, 0), jnp.repeat(lens, G), jax.random.key(4)))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["lengths"], b["lengths"])
    np.testing.assert_allclose(a["logp"], b["logp"], rtol=1e-5, atol=1e-5)
    assert len({tuple(r) for r in a["tokens"][:G]}) > 1  # the samples of a prompt differ


def test_finished_rows_leave_the_batch_without_changing_the_others(tiny_model_cfg, tiny_params, narrow_windows):
    """Per-row caps (`max_new_per_row`): capped rows end at their cap with the same first tokens as
    uncapped, the others are unchanged although they run on in a compacted batch (row_steps shows the
    decode cost following the real token counts)."""
    prompts, lens = prompts_batch(tiny_model_cfg, [8, 3, 5, 1])
    scfg = SamplingConfig(max_new_tokens=40, eos_id=-1, pad_id=PAD, temperature=1.0, num_samples=8)
    N = 32
    caps = np.where(np.arange(N) % 4 == 0, 40, np.arange(N) % 5 + 1).astype(np.int32)  # 8 rows run to the end
    full = jax.device_get(sample(tiny_model_cfg, scfg, tiny_params, prompts, lens, jax.random.key(9)))
    capped = jax.device_get(sample(tiny_model_cfg, scfg, tiny_params, prompts, lens, jax.random.key(9),
                                   max_new_per_row=jnp.asarray(caps)))
    assert full["row_steps"] == N * 40
    assert capped["row_steps"] < N * 40 / 2  # 8 rows after the first decode chunk
    np.testing.assert_array_equal(capped["lengths"], caps)
    for i, n in enumerate(caps):
        np.testing.assert_array_equal(capped["tokens"][i, :n], full["tokens"][i, :n])
        assert np.all(capped["tokens"][i, n:] == PAD) and np.all(capped["logp"][i, n:] == 0)
        np.testing.assert_allclose(capped["logp"][i, :n], full["logp"][i, :n], rtol=1e-5, atol=1e-5)


def test_sampling_in_passes_gives_the_tokens_of_one_pass(tiny_model_cfg, tiny_params):
    """`prompts_per_pass` bounds the KV caches live at once; row r draws row r's randomness in any pass, so
    tokens (and per-row caps) are those of sampling the batch whole."""
    prompts, lens = prompts_batch(tiny_model_cfg, [8, 3, 5, 1])
    whole = SamplingConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=1.5, num_samples=3)
    caps = jnp.asarray(np.arange(12) % 7 + 3, jnp.int32)
    a = jax.device_get(sample(tiny_model_cfg, whole, tiny_params, prompts, lens, jax.random.key(5), caps))
    b = jax.device_get(sample(tiny_model_cfg, dataclasses.replace(whole, prompts_per_pass=2), tiny_params, prompts,
                              lens, jax.random.key(5), caps))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["lengths"], b["lengths"])
    np.testing.assert_allclose(a["logp"], b["logp"], rtol=1e-5, atol=1e-5)
    assert len({tuple(r) for r in a["tokens"]}) == 12  # every row drew its own tokens
