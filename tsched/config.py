"""The one config system of tsched: a base `ConfigDict` every experiment overrides, and its validation.

Experiments live in `configs/<name>.py` as `get_config()` returning `base_config()` with a few fields
changed. Any field can be overridden from the command line (`--config.rl.steps=200`). The config is
locked, so an unknown field fails at parse time; `validate` then checks enums and ranges before any
work starts, naming the field and the allowed values.
"""

from __future__ import annotations

import ml_collections

# Allowed values of every enum-like field, checked by `validate`.
CHOICES = {
    "data.families": None,  # checked against the task registry (comma-separated list)
    "model.dtype": ("float32", "bfloat16"),
    "rl.advantage": ("grpo", "drgrpo", "rloo"),
    "rl.loss": ("ppo", "gspo"),
    "rl.aggregation": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "rl.kl_estimator": ("k1", "k3"),
    "rl.credit.strategy": ("uniform", "tp", "forking", "entropy_adv", "off_policy"),
    "rl.credit.normalizer": ("selected_tokens", "valid_tokens"),
    "rl.schedule.mode": ("linear", "sigmoid", "gamma", "cosine", "rex", "constant"),
}


def base_config() -> ml_collections.ConfigDict:
    """Every field tsched reads, with the defaults of the built-in CPU experiment."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.run_dir = "runs/default"  # checkpoints, logs, tokenizer and summary.json go here

    c.data = ml_collections.ConfigDict()
    c.data.families = "gcd,sort"  # comma-separated task families (tsched.data.tasks)
    c.data.min_difficulty = 1
    c.data.max_difficulty = 3
    c.data.train_size = 20000
    c.data.eval_size = 500
    c.data.data_dir = ""  # TFDS data dir; "" = <run_dir>/tfds
    c.data.prompt_len = 24  # prompts are left-padded to this many tokens (static shape)
    c.data.max_solution_tokens = 64  # SFT sequences are prompt_len + this

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.model_path = ""  # a sentencepiece .model; "" = train one on the task corpus
    c.tokenizer.vocab_size = 64

    c.model = ml_collections.ConfigDict()
    c.model.preset = ""  # a named preset from tsched.model.presets overrides the dims below
    c.model.d_model = 128
    c.model.n_layers = 3
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.head_dim = 32
    c.model.ffn_dim = 384
    c.model.rope_theta = 10000.0
    c.model.norm_eps = 1e-6
    c.model.qk_norm = False
    c.model.qkv_bias = False
    c.model.tie_embeddings = True
    c.model.dtype = "float32"  # compute dtype of matmul inputs; accumulation and weights stay float32
    c.model.remat = False
    c.model.scan_layers = False  # nn.scan over layers in full passes: True for deep models (compile time)
    # Memory at long sequences / large vocabularies, 0 = off (fastest at this tiny shape). A 4B model with
    # 4k-token responses: logits_chunk 512 (log-probs without the [N, T, V] logits), attn_block 512.
    c.model.logits_chunk = 0  # positions per chunk of the update's log-prob / entropy computation
    c.model.attn_block = 0  # key slots per block of blockwise (flash) attention in full passes

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 300
    c.sft.batch_size = 64
    c.sft.lr = 3e-3
    c.sft.warmup_steps = 50

    c.rl = ml_collections.ConfigDict()
    c.rl.steps = 160
    c.rl.prompts_per_step = 16
    c.rl.group_size = 8
    c.rl.max_new_tokens = 64
    c.rl.temperature = 1.0
    c.rl.top_p = 1.0
    c.rl.top_k = 0  # 0 = off
    c.rl.lr = 1e-4
    c.rl.max_grad_norm = 1.0
    c.rl.micro_batches = 1  # gradient accumulation: one optimizer step over this many slices
    c.rl.advantage = "grpo"
    c.rl.loss = "ppo"
    c.rl.clip_low = 0.2
    c.rl.clip_high = 0.28
    c.rl.dual_clip = 3.0  # 0 = off
    c.rl.aggregation = "token-mean"
    c.rl.kl_coef = 0.0
    c.rl.kl_estimator = "k3"
    c.rl.entropy_coef = 0.0

    c.rl.credit = ml_collections.ConfigDict()
    c.rl.credit.strategy = "tp"
    c.rl.credit.normalizer = "selected_tokens"
    c.rl.credit.alpha = 0.4  # entropy_adv
    c.rl.credit.kappa = 2.0  # entropy_adv

    c.rl.schedule = ml_collections.ConfigDict()
    c.rl.schedule.mode = "linear"
    c.rl.schedule.initial_magnitude = 0.99
    c.rl.schedule.min_ratio = 0.0
    c.rl.schedule.max_ratio = 0.8
    c.rl.schedule.total_steps = c.rl.get_ref("steps")
    c.rl.schedule.gamma = 2.0
    c.rl.schedule.sigmoid_k = 8.0

    c.verify = ml_collections.ConfigDict()
    c.verify.num_workers = 2
    c.verify.timeout_s = 5.0
    c.verify.max_chars = 4096  # completions are truncated before they reach a checker
    c.verify.memory_mb = 1024  # address-space limit of each worker

    c.eval = ml_collections.ConfigDict()
    c.eval.num_problems = 500
    c.eval.batch_size = 250
    c.eval.samples = 4  # the headline accuracy is avg@k: mean correctness of k samples per problem
    c.eval.temperature = 1.0  # of those samples (= rl.temperature by default); greedy is reported too

    c.train = ml_collections.ConfigDict()
    c.train.resume = False
    c.train.checkpoint_every = 20
    c.train.keep_checkpoints = 2
    c.train.log_every = 5
    c.train.kl_metrics = True  # KL to the initial policy by trajectory percentile (one extra forward pass)
    c.train.progress = True
    return c


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises `ValueError` naming the first invalid field and what it allows."""
    from tsched.data import tasks  # local: keep config importable without the data stack

    for field, allowed in CHOICES.items():
        value = _get(cfg, field)
        if field == "data.families":
            names = [f.strip() for f in value.split(",") if f.strip()]
            bad = [n for n in names if n not in tasks.FAMILIES]
            if not names or bad:
                raise ValueError(
                    f"config field 'data.families' = {value!r}: unknown family {bad or value!r}; "
                    f"allowed: comma-separated subset of {sorted(tasks.FAMILIES)}")
        elif value not in allowed:
            raise ValueError(f"config field {field!r} = {value!r} is not one of {list(allowed)}")

    def check(field, ok, what):
        if not ok(_get(cfg, field)):
            raise ValueError(f"config field {field!r} = {_get(cfg, field)!r}: must be {what}")

    positive = lambda v: v > 0
    for f in ("sft.batch_size", "rl.steps", "eval.samples", "rl.prompts_per_step", "rl.max_new_tokens", "data.prompt_len",
              "data.train_size", "data.eval_size", "eval.num_problems", "eval.batch_size", "model.d_model",
              "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.head_dim", "model.ffn_dim",
              "verify.num_workers", "verify.timeout_s", "tokenizer.vocab_size", "train.log_every",
              "train.checkpoint_every", "rl.micro_batches"):
        check(f, positive, "> 0")
    check("rl.group_size", lambda v: v >= 2, ">= 2 (group advantages need at least two samples)")
    check("sft.steps", lambda v: v >= 0, ">= 0")
    check("rl.temperature", lambda v: v > 0, "> 0 (RL needs a sampling distribution)")
    check("rl.top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    check("rl.top_k", lambda v: v >= 0, ">= 0")
    check("model.logits_chunk", lambda v: v >= 0, ">= 0 (0 = off)")
    check("model.attn_block", lambda v: v >= 0, ">= 0 (0 = off)")
    check("rl.clip_low", lambda v: 0 <= v < 1, "in [0, 1)")
    check("rl.clip_high", lambda v: v >= 0, ">= 0")
    check("rl.dual_clip", lambda v: v == 0 or v > 1, "0 (off) or > 1")
    check("rl.schedule.min_ratio", lambda v: 0 <= v <= 1, "in [0, 1]")
    check("rl.schedule.max_ratio", lambda v: 0 <= v <= 1, "in [0, 1]")
    check("rl.schedule.initial_magnitude", lambda v: 0 <= v <= 1, "in [0, 1]")
    check("data.min_difficulty", lambda v: v >= 1, ">= 1")
    check("data.max_difficulty", lambda v: v >= cfg.data.min_difficulty, ">= data.min_difficulty")
    check("model.n_heads", lambda v: v % cfg.model.n_kv_heads == 0, "a multiple of model.n_kv_heads")
    check("eval.num_problems", lambda v: v <= cfg.data.eval_size, "<= data.eval_size")
    s = cfg.rl.schedule
    if s.mode != "constant":
        s0, s1 = int(s.total_steps * s.min_ratio), int(s.total_steps * s.max_ratio)
        if s1 <= s0:
            raise ValueError(
                f"config fields 'rl.schedule.min_ratio'/'rl.schedule.max_ratio' = {s.min_ratio}/{s.max_ratio}: "
                f"with total_steps={s.total_steps} they give start step {s0} >= end step {s1}")
    n = cfg.rl.prompts_per_step * cfg.rl.group_size
    if n % cfg.rl.micro_batches:
        raise ValueError(f"config field 'rl.micro_batches' = {cfg.rl.micro_batches}: must divide "
                         f"rl.prompts_per_step * rl.group_size = {n}")
