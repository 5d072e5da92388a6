"""RL step benchmark: time per phase against the FLOP bound this machine measures for itself.

    python -m tsched.bench [--dtypes float32,bfloat16] [--steps 5] [--lengths forced|varied] [--external]
        [--json PATH] [--smoke]

Defaults are the reference shape: decoder with 4 layers, d_model 256, ffn 1024, 4 query / 2 kv heads,
head_dim 64, vocab 512, tied embeddings (4.07M parameters); 8 prompts x 8 samples, prompt 64 tokens,
128 new tokens (EOS disabled, so every row runs to full length); no KL reference model; the update in
4 micro-batches of 16 sequences (`--micro-batches`; exact gradient accumulation, one optimizer step:
on this CPU, slices of ~2-3k tokens run faster than the whole batch at once).

FLOPs (multiply-add = 2), per token of a forward pass with `ctx` visible keys:
    2 * (non-embedding matmul params) + 2 * d_model * vocab + 4 * n_layers * n_heads * head_dim * ctx
Sampling counts the prefill of the B prompts and every decoded token at its true context length; the
score pass and the loss forward count the same useful work (each prompt once for its G rows, as they run
it, and each response token at its context; not the padding of length buckets, nor each row's rerun of
its prompt's last token); backward = 2 x forward.
Peak: a jitted 2048^3 matmul in float32, and with bfloat16 inputs and float32 accumulation.

Response lengths (`--lengths`): `forced` (the default) runs every row to the budget T. `varied` runs
that forced shape and then the same shape with response lengths drawn from a long tail, as RLVR responses
are: L = clip(ceil(X), 1, T), X lognormal with sigma 1 and mu = ln(T / 4) - 1/2 (unclipped mean T / 4;
clipped, the mean is 0.237 T, the median 0.16 T, and 3% of rows reach the budget), one draw of N lengths
from numpy's default_rng(`--seed`), the same for every step. Its tokens and FLOP columns count useful
(non-padding) work only, and the RL step's varied / forced time ratio is printed. The update runs in
`--length-buckets` buckets (rl.length_buckets; default 3: packed micro-batches at T / 4, T / 2 or T
columns and R / 4, R / 2 or R rows, `tsched.train.learner.bucket_shapes`) in both runs. How the lengths
arise: the sampler's per-row budget (`max_new_per_row`) ends each row at its drawn length (EOS stays
disabled), and finished rows leave the decode batch between chunks as they do in training. The varied run
also prints what one decode step costs at each batch size the sampler compacts to (N rows, N / 2, ...,
down to its smallest bucket; `decode_step_cost`, from whole sampler calls with per-row caps) and a
straight-line fit, fixed cost + cost per row: the fixed part is what the few longest rows pay on every
step of the tail.

Phases, each the median over `--steps` steady-state steps after one warm-up:
    sample     the jitted sampler (prefill + while_loop decode)
    score      a separate old-log-prob forward pass (reported; the on-policy update does not run it)
    verify     detokenized text through the verifier pool (the rollout's texts)
    loss       forward + backward of the scheduled RL objective (the learner's `policy_gradient`)
    optimizer  the optax update
    rl_step    `tsched.rollout.generate` (sample + verify) + the jitted update: the trainer's step

`--external` then runs `tsched.bench.external` (Hugging Face `generate` and TRL's GRPO trainer, PyTorch, at
the same shape, float32, forced lengths; needs requirements-test.txt) as its own process and prints
tsched's float32 sampler and RL step beside them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from tsched import model as model_lib
from tsched import rollout
from tsched.bench import external as external_lib
from tsched.config import base_config
from tsched.model import ModelConfig
from tsched.sampling.sampler import DECODE_CHUNK, MIN_BUCKET, SamplingConfig, sample
from tsched.train import learner
from tsched.verify.pool import VerifierPool


def forward_flops(cfg: ModelConfig, ctx: float) -> float:
    """FLOPs of one token's forward pass with `ctx` visible keys."""
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    matmul_params = cfg.n_layers * (D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F)
    return 2 * matmul_params + 2 * D * cfg.vocab_size + 4 * cfg.n_layers * H * Dh * ctx


def sample_flops(cfg, B, P, lengths) -> float:
    """B prompts of P tokens, each run once, then each row's `lengths[i]` tokens at their context: the
    sampler's prefill and decode, and the forward pass of the update over the same rows."""
    prefill = B * sum(forward_flops(cfg, c + 1) for c in range(P))
    return prefill + sum(forward_flops(cfg, P + t + 1) for L in lengths for t in range(L))


def varied_lengths(T: int, N: int, seed: int) -> np.ndarray:
    """N response lengths in [1, T] from the long-tailed distribution of the module docstring."""
    x = np.random.default_rng(seed).lognormal(np.log(T / 4) - 0.5, 1.0, N)
    return np.clip(np.ceil(x), 1, T).astype(np.int32)


class IdsAsText:
    """Detokenizer of the bench's random vocabulary: ids as numbers, and a final `Answer:` line so the
    verifier parses every completion as a real one would be."""

    pad_id, eos_id = 0, -1

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return " ".join(map(str, ids[:8])) + f" Answer: {sum(ids) % 7}"


def median_time(fn, steps: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compile)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def decode_step_cost(timed, N: int, T: int) -> dict[int, float]:
    """Seconds per decode step at each batch the sampler compacts to (N rows, then N/2, N/4, ... down to
    MIN_BUCKET), from whole sampler calls timed by `timed(caps)` (seconds of one call with per-row caps
    [N]): all rows capped at 1 token (the prefill and one step of N rows), all at T (T steps of N rows),
    and n evenly spaced rows at T with the rest at 1 (one chunk of DECODE_CHUNK steps at N rows, then n
    rows to the end). Each step cost averages the growing attention windows and includes the host's
    checks between chunks."""
    ones = np.ones(N, np.int32)
    t_one = timed(ones)
    cost = {N: (timed(np.full(N, T, np.int32)) - t_one) / (T - 1)}
    first = min(DECODE_CHUNK, T)
    n = 1 << ((N - 1).bit_length() - 1)  # the largest power of two below N
    while T > first and n >= MIN_BUCKET:
        caps = ones.copy()
        caps[np.arange(n) * (N // n)] = T
        cost[n] = (timed(caps) - t_one - (first - 1) * cost[N]) / (T - first)
        n //= 2
    return cost


def matmul_peak(dtype, n: int = 2048, steps: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / median_time(lambda: f(a, a), steps) / 1e9


def run(dtype: str, args, peak: float, lengths: str = "forced") -> dict:
    mcfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, head_dim=args.head_dim, ffn_dim=args.ffn, dtype=dtype)
    B, G, P, T = args.prompts, args.samples, args.prompt_len, args.new_tokens
    N = B * G
    cfg = base_config()
    cfg.rl.group_size, cfg.rl.prompts_per_step, cfg.rl.max_new_tokens = G, B, T
    cfg.rl.micro_batches, cfg.rl.length_buckets = args.micro_batches, args.length_buckets
    params = model_lib.init_params(mcfg, jax.random.key(0))
    tx = learner.make_optimizer(1e-4, 1.0)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(4, args.vocab, (B, P)), jnp.int32)
    prompt_lens = jnp.full((B,), P, jnp.int32)
    scfg = SamplingConfig(max_new_tokens=T, eos_id=-1, pad_id=0, temperature=1.0, num_samples=G)
    row_lens = varied_lengths(T, N, args.seed) if lengths == "varied" else np.full(N, T, np.int32)
    cap = {"max_new_per_row": jnp.asarray(row_lens)} if lengths == "varied" else {}

    key = [0]
    sample_prompts = functools.partial(sample, mcfg, scfg, params, prompts, prompt_lens)

    def do_sample():
        key[0] += 1
        return sample_prompts(jax.random.key(key[0]), **cap)

    out = jax.block_until_ready(do_sample())
    t_sample = median_time(do_sample, args.steps)
    decode = None
    if lengths == "varied":  # what a decode step costs at each batch size the sampler compacts to (the tail's)
        decode = decode_step_cost(lambda caps: median_time(
            lambda: sample_prompts(jax.random.key(0), max_new_per_row=jnp.asarray(caps)), args.steps), N, T)
    completions = jnp.where(jnp.arange(T)[None] < row_lens[:, None], out["tokens"], 0)
    rewards = jnp.asarray(rng.integers(0, 2, N), jnp.float32)
    prompt, rows = learner.split_batch(prompts, prompt_lens, completions, jnp.asarray(row_lens))
    rows["adv"] = rewards - rewards.mean()

    score = jax.jit(lambda p: learner.score(cfg.rl, mcfg, p, rows, prompt)[0])  # the learner's scoring pass
    t_score = median_time(lambda: score(params), args.steps)

    # the learner's own gradient computation, in `--micro-batches` slices
    grad = jax.jit(lambda p: learner.policy_gradient(cfg.rl, mcfg, p, None, jnp.float32(0.5), rows, prompt)[:2])
    t_loss = median_time(lambda: grad(params), args.steps)
    grads = grad(params)[1]
    opt_state = tx.init(params)
    opt = jax.jit(lambda g, s, p: tx.update(g, s, p))
    t_opt = median_time(lambda: opt(grads, opt_state, params), args.steps)

    batch = {"prompt": np.asarray(prompts), "prompt_len": np.asarray(prompt_lens),
             "answer": np.array([str(b % 5) for b in range(B)]), "verifier": np.array(["numeric"] * B)}
    with VerifierPool(num_workers=2, timeout_s=5.0) as pool:
        ro = rollout.generate(mcfg, scfg, params, batch, jax.random.key(0), IdsAsText(), pool,
                              max_new_per_row=row_lens)  # warms the workers; texts of the drawn lengths
        t_verify = median_time(lambda: pool.score(ro.texts, ["1"] * N, ["numeric"] * N), args.steps)

        state = learner.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(1))
        rl_step = learner.make_rl_step(cfg, mcfg, tx)
        holder = {"state": state}

        def full_step():  # what the trainer's loop does per step
            key[0] += 1
            ro = rollout.generate(mcfg, scfg, holder["state"]["params"], batch, jax.random.key(key[0]), IdsAsText(),
                                  pool, max_new_per_row=row_lens)
            holder["state"], m = rl_step(holder["state"], None, ro.learner_batch())
            return m

        t_step = median_time(full_step, args.steps)

    f_sample = f_fwd = sample_flops(mcfg, B, P, row_lens)  # the update's useful forward is the sampler's work
    n_resp = int(row_lens.sum())
    n_seq = B * P + n_resp  # useful tokens: each prompt once
    phases = {
        "sample": (t_sample, f_sample, n_resp),
        "score": (t_score, f_fwd, n_seq),
        "verify": (t_verify, 0.0, N),
        "loss": (t_loss, 3 * f_fwd, n_seq),
        "optimizer": (t_opt, 0.0, 0),
        "rl_step": (t_step, f_sample + 3 * f_fwd, n_resp),
    }
    return {"dtype": dtype, "lengths": lengths, "mean_length": float(row_lens.mean()),
            "max_length": int(row_lens.max()), "params": mcfg.num_params(), "peak_gflops": peak, "phases": {
        k: {"median_s": t, "gflop": f / 1e9, "gflops": f / t / 1e9 if f else 0.0,
            "pct_peak": 100 * f / t / 1e9 / peak if f else 0.0, "tokens_per_s": n / t if n else 0.0}
        for k, (t, f, n) in phases.items()},
        "sample_tokens_per_s": n_resp / t_sample, "rl_step_s": t_step, "decode_step_s": decode}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    external_lib.shape_args(ap)
    ap.add_argument("--length-buckets", type=int, default=3,
                    help="rl.length_buckets: the update's micro-batch shapes, T / 2^j columns and R / 2^i rows, i + j < n")
    ap.add_argument("--lengths", choices=("forced", "varied"), default="forced",
                    help="varied: also a run with long-tailed response lengths (see the docstring)")
    ap.add_argument("--seed", type=int, default=0, help="of the varied response lengths")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--external", action="store_true",
                    help="also time HF generate and TRL's GRPO step at this shape (tsched.bench.external)")
    ap.add_argument("--json", default="")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps: checks the harness runs")
    args = ap.parse_args(argv)
    if args.external and "float32" not in args.dtypes.split(","):
        ap.error("--external compares the float32 forced-length run: include float32 in --dtypes")
    if args.smoke:
        args.layers, args.d_model, args.ffn, args.heads, args.kv_heads, args.head_dim = 1, 32, 64, 2, 1, 16
        args.vocab, args.prompts, args.samples, args.prompt_len, args.new_tokens, args.steps = 64, 2, 2, 8, 8, 2
        args.micro_batches = 2

    peaks = {"float32": matmul_peak(jnp.float32), "bfloat16": matmul_peak(jnp.bfloat16)}
    runs = ("forced", "varied") if args.lengths == "varied" else ("forced",)
    results = [run(d, args, peaks[d], lengths) for d in args.dtypes.split(",") for lengths in runs]
    print(f"tsched.bench | {jax.devices()[0].device_kind} x {jax.device_count()} | matmul peak: "
          f"f32 {peaks['float32']:.0f} GFLOP/s, bf16-in/f32-acc {peaks['bfloat16']:.0f} GFLOP/s")
    print(f"update in {args.micro_batches} micro-batches, {args.length_buckets} length buckets; shape: "
          f"{args.layers} layers, d {args.d_model}, ffn {args.ffn}, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, vocab {args.vocab} ({results[0]['params'] / 1e6:.2f}M params); "
          f"{args.prompts} prompts x {args.samples} samples, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"{'dtype':<9} {'phase':<10} {'median s':>9} {'GFLOP':>7} {'GFLOP/s':>8} {'% peak':>7} {'tokens/s':>9}")
    for r in results:
        if len(runs) > 1:
            print(f"-- {r['dtype']}, {r['lengths']} lengths: mean {r['mean_length']:.1f}, max {r['max_length']} "
                  f"(useful tokens only)")
        for k, p in r["phases"].items():
            print(f"{r['dtype']:<9} {k:<10} {p['median_s']:>9.3f} {p['gflop']:>7.1f} {p['gflops']:>8.1f} "
                  f"{p['pct_peak']:>6.1f}% {p['tokens_per_s']:>9.0f}")
        if r["decode_step_s"]:
            rows, cost = zip(*r["decode_step_s"].items())
            line = ", ".join(f"{n} rows {1e3 * c:.2f} ms" for n, c in zip(rows, cost))
            if len(rows) > 1:
                per_row, fixed = np.polyfit(rows, cost, 1)
                line += f" (fit: {1e3 * fixed:.2f} ms + {1e3 * per_row:.3f} ms per row)"
            print(f"{r['dtype']}: decode step by batch rows: {line}")
    pairs = zip(results[::2], results[1::2]) if len(runs) == 2 else ()  # (forced, varied) with --lengths=varied
    for forced, varied in pairs:
        varied["rl_step_vs_forced"] = varied["rl_step_s"] / forced["rl_step_s"]
        ratios = ", ".join(f"{k} {varied['phases'][k]['median_s'] / forced['phases'][k]['median_s']:.2f}"
                           for k in ("sample", "score", "verify", "loss"))
        print(f"{varied['dtype']}: varied / forced time: rl_step {varied['rl_step_vs_forced']:.2f}, {ratios}")
    external = side_by_side(args, results) if args.external else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "external": external}, f, indent=2)


def side_by_side(args, results) -> dict:
    """Runs tsched.bench.external at this shape in its own process; prints and returns its numbers with
    tsched's float32 forced-length ones."""
    ours = next(r for r in results if r["dtype"] == "float32" and r["lengths"] == "forced")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "external.json")
        flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (*external_lib.REFERENCE_SHAPE, "steps")]
        subprocess.run([sys.executable, "-m", "tsched.bench.external", *flags, f"--json={out}"], check=True)
        with open(out) as f:
            ext = json.load(f)
    ext["sample_vs_generate"] = ours["sample_tokens_per_s"] / ext["generate_tokens_per_s"]
    ext["rl_step_vs_grpo_step"] = ours["rl_step_s"] / ext["grpo_step_s"]
    v = ext["versions"]
    print(f"side by side, float32, forced lengths (torch {v['torch']}, transformers {v['transformers']}, "
          f"trl {v['trl']}, {ext['torch_threads']} threads):")
    print(f"  sampler   tsched {ours['sample_tokens_per_s']:>8.0f} new tokens/s   HF generate "
          f"{ext['generate_tokens_per_s']:>8.0f}   ratio {ext['sample_vs_generate']:.2f}x")
    print(f"  RL step   tsched {ours['rl_step_s']:>8.3f} s            TRL GRPO    "
          f"{ext['grpo_step_s']:>8.3f} s   tsched / TRL {ext['rl_step_vs_grpo_step']:.2f}")
    return ext


if __name__ == "__main__":
    main()
