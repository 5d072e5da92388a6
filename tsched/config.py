"""The one config system of tsched: a base `ConfigDict` every experiment overrides, and its validation.

Experiments live in `configs/<name>.py` as `get_config()` returning `base_config()` with a few fields
changed. Any field can be overridden from the command line (`--config.rl.steps=200`). The config is
locked, so an unknown field fails at parse time; `validate` then checks every field before any work
starts and raises `ConfigError` naming the field, the bad value and what is allowed.

Allowed names are never listed here: a field that picks a registered function (a credit criterion, a
schedule profile, an advantage estimator, a task family, a preset, ...) is checked against its registry,
so adding one is one registered function.
"""

from __future__ import annotations

import math
import os
import re

import ml_collections


class ConfigError(ValueError):
    """An invalid config; the message names the field, the bad value and what is allowed."""


def _follow(section: ml_collections.ConfigDict, field: str):
    """A field that takes `section.field`'s value unless set itself.

    A plain `get_ref` shares one value both ways (setting the follower would change the source, e.g.
    `rl.schedule.total_steps=50` would silently set `rl.steps=50`); a derived reference follows the
    source and, once overridden, is replaced without touching it.
    """
    return section.get_ref(field) + 0


def base_config() -> ml_collections.ConfigDict:
    """Every field tsched reads, with the defaults of the built-in CPU experiment."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.run_dir = "runs/default"  # checkpoints, logs, tokenizer copy and summary.json go here

    c.data = ml_collections.ConfigDict()
    # `tasks` (the built-in suite below) or a reader of tsched.data.sources.READERS (jsonl, parquet, tfds)
    # reading data.train_files / data.eval_files (docs/data.md for the spec syntax; eval may name sets).
    c.data.source = "tasks"
    c.data.train_files = ""
    c.data.eval_files = ""  # e.g. "gsm8k=data/gsm8k_test.jsonl;math500=data/math500.jsonl"
    c.data.fields = ml_collections.ConfigDict()  # record field read for each key ("" = never read it)
    c.data.fields.problem = "problem"
    c.data.fields.answer = "answer"
    c.data.fields.solution = "solution"
    c.data.fields.verifier = "verifier"
    c.data.fields.family = "family"
    c.data.fields.difficulty = "difficulty"
    c.data.verifier = "math"  # verifier of file records that name none
    c.data.skip_bad_records = False  # drop (and count) bad file records instead of stopping
    # How a problem becomes the prompt (tsched.data.templates): plain, boxed, chat (the checkpoint's chat
    # template), or any string containing {problem}.
    c.data.template = "plain"
    c.data.chat_thinking = False  # chat: Qwen3's enable_thinking
    # comma-separated task families (tsched.data.tasks). The default: running sums of 6-12 digits, one
    # addition per step, 55-110 tokens with the answer at the end, solutions slipping at 6% of steps.
    c.data.families = "chain"
    c.data.min_difficulty = 1
    c.data.max_difficulty = 3
    # Probability that each step of a built-in reference solution writes its result off by one and carries
    # on from it (families arith and chain; the others and file sources ignore it; tsched.data.tasks): SFT
    # then learns a policy that slips anywhere in a long trace, which RL has to remove. The problems and
    # their answers are those of rate 0.
    c.data.solution_error_rate = 0.06
    c.data.train_size = 20000
    c.data.eval_size = 500
    c.data.data_dir = ""  # dataset and tokenizer cache; "" = <parent of run_dir>/.data, shared by runs
    c.data.prompt_len = 32  # prompts are left-padded to this many tokens (static shape)
    c.data.max_solution_tokens = 112  # reference solutions (SFT targets, off-policy prefixes) are cut here

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.model_path = ""  # a sentencepiece .model or HF tokenizer.json; "" = train one on the tasks
    c.tokenizer.vocab_size = 64

    c.model = ml_collections.ConfigDict()
    # A Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json, generation_config.json):
    # dimensions and weights come from it, the tokenizer too unless tokenizer.model_path is set.
    c.model.init_from = ""
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
    c.model.scan_layers = False  # lax.scan over layers in full passes: True for deep models (compile time)
    # Memory at long sequences / large vocabularies, 0 = off (fastest at this tiny shape). A 4B model with
    # 4k-token responses: logits_chunk 512 (log-probs without the [N, T, V] logits), attn_block 512.
    c.model.logits_chunk = 0  # positions per chunk of the update's log-prob / entropy computation
    c.model.attn_block = 0  # key slots per block of blockwise (flash) attention in full passes

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Multi-host (tsched.multihost): one process per host over one mesh of every host's devices. 0 / -1 /
    # "" detect a Cloud TPU VM (JAX reads the slice from its metadata) and are one process elsewhere; on
    # other clusters give all three, e.g. --config.mesh.num_processes=2 --config.mesh.process_id=$RANK
    # --config.mesh.coordinator=host0:8476.
    c.mesh.num_processes = 0
    c.mesh.process_id = -1
    c.mesh.coordinator = ""

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = -1  # -1 = auto: 400 from scratch, 0 (no toy warm start) with model.init_from; see sft_steps
    c.sft.batch_size = 64
    c.sft.lr = 3e-3
    c.sft.warmup_steps = 50
    # Gradient accumulation, as rl.micro_batches / rl.length_buckets: the batch runs in this many slices of
    # similar target lengths (one optimizer step; the same loss and gradient as one pass); 0 = auto (slices
    # of >= 1024 tokens, tsched.train.learner.auto_slices: 8 here, an SFT step 0.36 s instead of 0.53).
    c.sft.micro_batches = 0
    c.sft.length_buckets = 1
    # A run directory whose final SFT checkpoint this run starts RL from instead of running SFT itself
    # (tsched.study shares one SFT per seed among methods). Its SFT must be the one this config would run:
    # the fields of WARM_START_FIELDS must be equal (checked by validate).
    c.sft.warm_start = ""

    c.rl = ml_collections.ConfigDict()
    c.rl.steps = 80
    c.rl.prompts_per_step = 16
    c.rl.group_size = 8
    c.rl.max_new_tokens = 112
    c.rl.temperature = 1.0
    c.rl.top_p = 1.0
    c.rl.top_k = 0  # 0 = off
    # KV cache values while sampling: auto = model.dtype; bfloat16 in a float32 run halves the cache the
    # decode reads (sampler/learner log-prob gap measured in the README).
    c.rl.cache_dtype = "auto"
    # Prompts the sampler takes per pass (with their group_size samples each), 0 = a step's all at once: one
    # pass's KV caches must fit beside the train state (tsched.plan prints the sampler's memory per chip).
    c.rl.prompts_per_pass = 0
    c.rl.lr = 1e-4
    c.rl.warmup_steps = 0  # optimizer steps over which the RL rate rises linearly from 0 to rl.lr; 0 = constant
    c.rl.max_grad_norm = 1.0
    # Gradient accumulation: one optimizer step over this many slices of each mini-batch (equal loss and
    # gradient, except for criteria with batch statistics, which take the slice's). 0 = auto
    # (tsched.train.learner.rl_slices): slices of >= 1024 tokens, one slice for those criteria; here 8
    # slices, the update 1.0 s instead of 1.3 (1.55 vs 2.1 s beside another run).
    c.rl.micro_batches = 0
    c.rl.mini_batches = 1  # optimizer steps per pass over a rollout batch (1 with epochs 1: on-policy)
    c.rl.epochs = 1  # passes over each rollout batch
    # Update cost that follows response lengths: each prompt's responses are packed into shared rows
    # (tsched.train.learner.pack), the packed rows sorted by fill into micro-batches, and each micro-batch
    # runs at the cheapest shape holding it, max_new_tokens / 2^j columns and rows / 2^i, i + j < n, each
    # shape compiled once. 1 = every micro-batch at full size (micro-batches without tokens still skipped);
    # pays with responses well below the budget.
    c.rl.length_buckets = 1
    # Where the update runs the prompts (tsched.train.learner.micro_stats): once per update for all the
    # rows sampled from them (least compute), or per_row inside each micro-batch (memory bounded by the
    # micro-batch: long prompts with one sequence per micro-batch, configs/qwen3_4b_tpu.py).
    c.rl.prompt_pass = "once"
    c.rl.advantage = "grpo"
    c.rl.loss = "ppo"
    c.rl.clip_low = 0.2
    c.rl.clip_high = 0.28
    c.rl.dual_clip = 3.0  # 0 = off
    c.rl.aggregation = "token-mean"
    c.rl.kl_coef = 0.0
    c.rl.kl_estimator = "k3"
    c.rl.entropy_coef = 0.0
    # Applied to each prompt batch before sampling, driven by the schedule magnitude r (tsched.rollout):
    # `none`, or `reference_prefix` (the paper's off-policy strategy: r of the reference solution as context).
    c.rl.prompt_transform = "none"

    c.rl.credit = ml_collections.ConfigDict()
    c.rl.credit.strategy = "tp"
    c.rl.credit.normalizer = "selected_tokens"
    c.rl.credit.alpha = 0.4  # entropy_adv
    c.rl.credit.kappa = 2.0  # entropy_adv
    c.rl.credit.d3s_max_drop = 1.0  # d3s: fraction of tokens dropped at r = 1 (ratios not published)
    c.rl.credit.d3s_scope = "response"  # d3s: rank |A| H per response or over the whole batch
    c.rl.credit.empg_k = 1.0  # empg: g = exp(-k Hn) / mean (paper)
    c.rl.credit.empg_k_f = 1.0  # empg: future-clarity bonus exp(-k_f Hn_{t+1}) (paper)
    c.rl.credit.empg_zeta = 0.1  # empg: bonus weight (paper)
    c.rl.credit.clip_cov_ratio = 2e-4  # rl.loss=clip_cov: fraction of tokens detached (paper, verl)
    c.rl.credit.clip_cov_lb = 1.0  # clip_cov: covariance band (lb, ub) of the candidates (verl)
    c.rl.credit.clip_cov_ub = 5.0
    c.rl.credit.kl_cov_ratio = 2e-4  # rl.loss=kl_cov: fraction of top-covariance tokens penalised (paper, verl)
    c.rl.credit.kl_cov_beta = 1.0  # kl_cov: |log ratio| coefficient (paper; verl's dataclass default 0.1)

    c.rl.trace = ml_collections.ConfigDict()  # rl.loss=trace (P-trace / S-trace, tsched's formalisation)
    c.rl.trace.lam = 0.9  # trace decay per trace token: 0 = token PPO, 1 = prefix mean (GSPO-like); ours
    c.rl.trace.entropy_top = 1.0  # top-entropy fraction per response carrying the trace: 1 = P-trace, < 1 = S-trace

    c.rl.schedule = ml_collections.ConfigDict()
    c.rl.schedule.mode = "linear"
    c.rl.schedule.initial_magnitude = 0.99
    c.rl.schedule.min_ratio = 0.0
    c.rl.schedule.max_ratio = 0.8
    c.rl.schedule.total_steps = _follow(c.rl, "steps")
    c.rl.schedule.gamma = 2.0
    c.rl.schedule.sigmoid_k = 8.0

    c.verify = ml_collections.ConfigDict()
    c.verify.num_workers = 2
    c.verify.timeout_s = 5.0
    c.verify.max_chars = 4096  # completions are truncated before they reach a checker
    c.verify.memory_mb = 1024  # address-space limit of each worker; 0 = none

    c.eval = ml_collections.ConfigDict()
    c.eval.num_problems = 500
    c.eval.batch_size = 250
    c.eval.samples = 4  # the headline accuracy is avg@k: mean correctness of k samples per problem
    # Of those samples: the RL sampling temperature unless set, so the headline measures what RL optimizes.
    c.eval.temperature = _follow(c.rl, "temperature")
    c.eval.pass_k = "1,4,8"  # unbiased pass@k for each k here up to eval.samples (python -m tsched.eval)
    c.eval.every = 0  # evaluate every N RL steps, logged as eval/<set>/...; 0 = off
    # With sft.warm_start: take the evaluation before RL from that run when it evaluated the same parameters
    # with the same key and settings (EVAL_FIELDS), so a study's methods do not repeat it per method.
    c.eval.reuse_warm_start = True

    c.train = ml_collections.ConfigDict()
    # `never` (False): an existing run_dir is moved aside and the run starts afresh; `auto` (True): continue
    # from the run_dir's checkpoints if it has any, else start afresh; `always`: a checkpoint must be there.
    c.train.resume = "never"
    c.train.force_resume = False  # resume even if the run_dir was written by a config that changes the result
    c.train.checkpoint_every = 20  # steps, in SFT and RL; the last step of each is always saved
    c.train.checkpoint_every_s = 0.0  # also save when this many seconds passed since the last save; 0 = off
    c.train.max_bad_steps = 5  # stop (with a checkpoint) after this many non-finite steps in a row
    c.train.keep_checkpoints = 2
    c.train.log_every = 5
    c.train.kl_metrics = True  # KL to the initial policy by trajectory percentile (one extra forward pass)
    c.train.progress = True
    c.train.export_hf = False  # write the final policy as a Hugging Face directory <run_dir>/hf
    return c


SFT_STEPS_FROM_SCRATCH = 400


def sft_steps(cfg) -> int:
    """SFT steps of the run: `sft.steps`, or with the default -1, 400 for a model trained from scratch
    and 0 for one started from `model.init_from` (a pretrained model gets no toy warm start)."""
    if cfg.sft.steps >= 0:
        return cfg.sft.steps
    return 0 if cfg.model.init_from else SFT_STEPS_FROM_SCRATCH


# Fields that decide what SFT produces (with sft_steps(cfg)): a warm start must agree on all of them, so
# starting from it gives exactly the parameters this run's own SFT would have given.
WARM_START_FIELDS = ("seed", "data.", "tokenizer.", "model.", "sft.")
# The SFT's slicing changes only the order of float sums, as the mesh does.
_WARM_START_FREE = ("data.data_dir", "sft.warm_start", "sft.micro_batches", "sft.length_buckets")


# Fields that decide the evaluation before RL besides the parameters (its key is the seed's; the sampling
# settings are rl.*'s): a warm start's evaluation is this run's when they are equal and its SFT is this run's.
EVAL_FIELDS = ("seed", "data.", "tokenizer.", "model.", "mesh.", "verify.", "eval.", "rl.max_new_tokens",
               "rl.temperature", "rl.top_p", "rl.top_k", "rl.cache_dtype", "rl.prompts_per_pass")
_EVAL_FREE = ("data.data_dir", "eval.every", "eval.reuse_warm_start")


# Fields added with a default other than the behaviour before them: the value a run written before the
# field existed ran with (the default experiment's slips came with the field).
VALUE_BEFORE_FIELD = {"data.solution_error_rate": 0.0}


def config_differences(cfg, saved_json: str, compared=None, free=()) -> list[str]:
    """`field: saved -> cfg` for each field whose value differs between `cfg` and a saved config.json's
    text, among the fields starting with one of `compared` (None: all) and none of `free`. A field the
    saved config lacks counts as what runs did before it existed: its `base_config` default, which keeps
    the old behaviour, or its VALUE_BEFORE_FIELD; so a run written before a field was added still
    resumes, and one whose behaviour the new default would change does not."""
    import json

    from flax.traverse_util import flatten_dict

    flat = lambda c: flatten_dict(json.loads(c.to_json_best_effort()), sep=".")
    old = {**flat(base_config()), **VALUE_BEFORE_FIELD, **flatten_dict(json.loads(saved_json), sep=".")}
    new = flat(cfg)
    missing = "(absent)"
    keys = [k for k in sorted(set(old) | set(new))
            if (compared is None or k.startswith(compared)) and not k.startswith(free)]
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}" for k in keys
            if old.get(k, missing) != new.get(k, missing)]


def warm_start_differences(cfg, saved_json: str) -> list[str]:
    """The differences in WARM_START_FIELDS between `cfg` and the config (json text) of a would-be warm start."""
    return config_differences(cfg, saved_json, WARM_START_FIELDS, _WARM_START_FREE)


def eval_differences(cfg, saved_json: str) -> list[str]:
    """The differences in EVAL_FIELDS between `cfg` and a saved config.json's text: none means the same
    parameters are evaluated to the same result."""
    return config_differences(cfg, saved_json, EVAL_FIELDS, _EVAL_FREE)


def warm_start_checkpoint(cfg) -> str:
    """The SFT checkpoint `sft.warm_start` names: `<run dir>/ckpt/sft/<sft_steps(cfg)>`."""
    return os.path.join(cfg.sft.warm_start, "ckpt", "sft", str(sft_steps(cfg)))


def _validate_warm_start(cfg) -> None:
    """`sft.warm_start` is a run directory with a finished SFT of `sft_steps(cfg)` steps, written by a config
    equal to this one in every field of WARM_START_FIELDS."""
    path = cfg.sft.warm_start
    if not path:
        return
    from etils import epath  # run directories may be on an object store

    from tsched.train.checkpoint import complete_steps

    if sft_steps(cfg) == 0:
        _fail("sft.warm_start", path, "this config runs no SFT (sft.steps resolves to 0): leave it empty")
    config_json = epath.Path(path) / "config.json"
    if not config_json.is_file():
        _fail("sft.warm_start", path, "must be a run directory with a config.json"
              + ("" if epath.Path(path).is_dir() else " (no such directory)"))
    if sft_steps(cfg) not in complete_steps(os.path.dirname(warm_start_checkpoint(cfg))):
        _fail("sft.warm_start", path, f"has no finished SFT checkpoint {warm_start_checkpoint(cfg)} "
                                      f"(SFT of {sft_steps(cfg)} steps)")
    diffs = warm_start_differences(cfg, config_json.read_text())
    if diffs:
        _fail("sft.warm_start", path, f"its SFT was run by a different config ({'; '.join(diffs)}); the fields "
                                      f"{list(WARM_START_FIELDS)} (but {list(_WARM_START_FREE)}) must be equal")


def pass_ks(cfg) -> list[int]:
    """The k of `eval.pass_k` that `eval.samples` samples per problem can estimate (k <= samples)."""
    ks = sorted({int(k) for k in str(cfg.eval.pass_k).split(",") if k.strip()})
    return [k for k in ks if k <= cfg.eval.samples]


def data_dir(cfg) -> str:
    """Where datasets and trained tokenizers are cached: deterministic functions of the data config,
    shared by the runs beside this one and never inside a run directory (moving a run aside keeps them).
    Beside a run directory on an object store (gs://...) it is a local cache instead: the tokenizer
    trainer writes plain files."""
    if cfg.data.data_dir:
        return cfg.data.data_dir
    if "://" in cfg.run_dir:
        return os.path.join(os.path.expanduser("~"), ".cache", "tsched", "data")
    return os.path.join(os.path.dirname(os.path.abspath(cfg.run_dir)), ".data")


def _registries() -> dict:
    """Fields whose allowed values are the names of a registry (imported here, not at module load, so
    the config stays cheap to import)."""
    from tsched import rollout
    from tsched.data import sources, tasks
    from tsched.model import presets
    from tsched.model.decoder import COMPUTE_DTYPES
    from tsched.rl import advantages, credit, losses, objective, schedules
    from tsched.sampling.sampler import CACHE_DTYPES
    from tsched.train.learner import PROMPT_PASSES
    from tsched.verify.verifiers import VERIFIERS

    return {
        "model.dtype": COMPUTE_DTYPES,
        "rl.cache_dtype": CACHE_DTYPES,
        "rl.prompt_pass": PROMPT_PASSES,
        "rl.advantage": advantages.ESTIMATORS,
        "rl.loss": losses.TOKEN_LOSSES,
        "rl.aggregation": losses.AGGREGATIONS,
        "rl.kl_estimator": losses.KL_ESTIMATORS,
        "rl.prompt_transform": rollout.PROMPT_TRANSFORMS,
        "rl.credit.strategy": credit.CRITERIA,
        "rl.credit.normalizer": objective.NORMALIZERS,
        "rl.credit.d3s_scope": credit.D3S_SCOPES,
        "rl.schedule.mode": schedules.PROFILES,
        "model.preset": ["", *presets.PRESETS],
        "data.families": tasks.FAMILIES,
        "data.source": ["tasks", *sources.READERS],
        "data.verifier": VERIFIERS,
    }


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _fail(field: str, value, what: str):
    raise ConfigError(f"config field {field!r} = {value!r}: {what}")


# (predicate, what it requires) for every numeric field; each entry is checked in this order.
_positive = (lambda v: v > 0, "must be > 0")
_non_negative = (lambda v: v >= 0, "must be >= 0")
_fraction = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_RANGES = {
    "seed": _non_negative,
    "data.min_difficulty": (lambda v: v >= 1, "must be >= 1"),
    **{f: _positive for f in ("data.train_size", "data.eval_size", "data.prompt_len", "data.max_solution_tokens",
                              "tokenizer.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
                              "model.n_kv_heads", "model.head_dim", "model.ffn_dim", "model.rope_theta",
                              "model.norm_eps", "sft.batch_size", "sft.lr", "sft.length_buckets", "rl.steps",
                              "rl.prompts_per_step",
                              "rl.max_new_tokens", "rl.temperature", "rl.lr", "rl.max_grad_norm",
                              "rl.mini_batches", "rl.epochs", "rl.length_buckets",
                              "rl.credit.kappa", "rl.schedule.total_steps", "rl.schedule.gamma", "verify.num_workers",
                              "verify.timeout_s", "verify.max_chars", "eval.num_problems", "eval.batch_size",
                              "eval.samples", "train.checkpoint_every",
                              "train.keep_checkpoints", "train.log_every", "train.max_bad_steps")},
    "sft.steps": (lambda v: v >= -1, "must be >= 0, or -1 for auto (400 from scratch, 0 with model.init_from)"),
    **{f: _non_negative for f in ("sft.micro_batches", "rl.micro_batches", "model.logits_chunk", "model.attn_block",
                                  "eval.every", "sft.warmup_steps",
                                  "rl.warmup_steps", "rl.prompts_per_pass", "rl.top_k", "rl.kl_coef", "rl.entropy_coef",
                                  "rl.credit.alpha", "rl.clip_high", "verify.memory_mb", "eval.temperature",
                                  "rl.credit.empg_k", "rl.credit.empg_k_f", "rl.credit.empg_zeta",
                                  "rl.credit.kl_cov_beta", "train.checkpoint_every_s")},
    **{f: _fraction for f in ("rl.schedule.initial_magnitude", "rl.schedule.min_ratio", "rl.schedule.max_ratio",
                              "rl.credit.d3s_max_drop", "rl.trace.lam")},
    **{f: (lambda v: 0 < v <= 1, "must be in (0, 1]") for f in ("rl.credit.clip_cov_ratio", "rl.credit.kl_cov_ratio",
                                                                 "rl.trace.entropy_top")},
    "rl.group_size": (lambda v: v >= 2, "must be >= 2 (group advantages need at least two samples)"),
    "rl.top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "rl.clip_low": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "data.solution_error_rate": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "rl.dual_clip": (lambda v: v == 0 or v > 1, "must be 0 (off) or > 1"),
    "rl.schedule.sigmoid_k": (lambda v: v != 0, "must be non-zero (the sigmoid profile divides by it)"),
}
for _axis in ("data", "fsdp", "tensor"):
    _RANGES[f"mesh.{_axis}"] = (lambda v: v == -1 or v >= 1, "must be >= 1, or -1 for the devices left")


RESUME_MODES = ("never", "auto", "always")
_RESUME_SPELLINGS = {"false": "never", "0": "never", "no": "never", "true": "auto", "1": "auto", "yes": "auto"}


def resume_mode(cfg) -> str:
    """`train.resume` as one of RESUME_MODES. The bool spellings keep their old meaning: `True` (what the
    launch scripts and sweeps pass) continues when there is a checkpoint and starts afresh otherwise."""
    value = cfg.train.resume
    mode = str(value).strip().lower()
    mode = _RESUME_SPELLINGS.get(mode, mode)
    if mode not in RESUME_MODES:
        _fail("train.resume", value, f"must be one of {list(RESUME_MODES)} (or True = auto, False = never)")
    return mode


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises `ConfigError` for the first invalid field. Reads nothing but the config and the registries
    (and the device and process counts for the mesh, from JAX unless `num_devices` is given); writes nothing."""
    resume_mode(cfg)
    for field, names in _registries().items():
        value = _get(cfg, field)
        if field == "data.families":  # a comma-separated subset
            parts = [p.strip() for p in value.split(",")]
            if not all(p in names for p in parts):
                _fail(field, value, f"must be comma-separated names from {list(names)}")
        elif value not in names:
            _fail(field, value, f"must be one of {list(names)}")
    for field, (ok, what) in _RANGES.items():
        value = _get(cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
            _fail(field, value, what)

    m, rl, s = cfg.model, cfg.rl, cfg.rl.schedule
    if cfg.data.max_difficulty < cfg.data.min_difficulty:
        _fail("data.max_difficulty", cfg.data.max_difficulty, f">= data.min_difficulty ({cfg.data.min_difficulty})")
    if cfg.data.source == "tasks" and cfg.eval.num_problems > cfg.data.eval_size:
        _fail("eval.num_problems", cfg.eval.num_problems, f"must be <= data.eval_size ({cfg.data.eval_size})")
    _validate_data(cfg)
    _validate_init_from(cfg)
    _validate_warm_start(cfg)
    try:
        ks = [int(k) for k in str(cfg.eval.pass_k).split(",") if k.strip()]
    except ValueError:
        ks = [0]
    if not all(k > 0 for k in ks):
        _fail("eval.pass_k", cfg.eval.pass_k, "must be comma-separated positive integers, e.g. '1,4,8'")
    if rl.credit.clip_cov_ub <= rl.credit.clip_cov_lb:
        _fail("rl.credit.clip_cov_ub", rl.credit.clip_cov_ub, f"must be > rl.credit.clip_cov_lb ({rl.credit.clip_cov_lb})")
    if not m.preset and m.n_heads % m.n_kv_heads:
        _fail("model.n_heads", m.n_heads, f"must be a multiple of model.n_kv_heads ({m.n_kv_heads})")
    if cfg.tokenizer.model_path and not os.path.isfile(cfg.tokenizer.model_path):
        _fail("tokenizer.model_path", cfg.tokenizer.model_path, "no such file")
    if cfg.data.template == "chat":
        from tsched.data import templates

        try:
            templates.load_chat_template(chat_template_dir(cfg))
        except (ValueError, OSError) as e:
            _fail("data.template", "chat", f"needs the checkpoint's chat template: {e}")
    vocab = _vocab_size(cfg)
    if rl.top_k > vocab:
        _fail("rl.top_k", rl.top_k, f"must be <= the vocabulary size ({vocab}); 0 = off")
    if s.mode != "constant":
        s0, s1 = int(s.total_steps * s.min_ratio), int(s.total_steps * s.max_ratio)
        if s1 <= s0:
            raise ConfigError(
                f"config fields 'rl.schedule.min_ratio'/'rl.schedule.max_ratio' = {s.min_ratio}/{s.max_ratio}: "
                f"with total_steps={s.total_steps} they give start step {s0} >= end step {s1}; "
                f"the decay needs s1 > s0 (or rl.schedule.mode=constant)")
    if rl.prompts_per_pass and rl.prompts_per_step % rl.prompts_per_pass:
        _fail("rl.prompts_per_pass", rl.prompts_per_pass, f"must divide rl.prompts_per_step ({rl.prompts_per_step}); "
                                                          f"0 = all at once")
    n = rl.prompts_per_step * rl.group_size
    if cfg.sft.micro_batches and cfg.sft.batch_size % cfg.sft.micro_batches:
        _fail("sft.micro_batches", cfg.sft.micro_batches, f"must divide sft.batch_size ({cfg.sft.batch_size})")
    if 2 ** (cfg.sft.length_buckets - 1) > cfg.data.max_solution_tokens:
        _fail("sft.length_buckets", cfg.sft.length_buckets, f"must be <= 1 + log2(data.max_solution_tokens = "
                                                            f"{cfg.data.max_solution_tokens})")
    if n % rl.mini_batches:
        _fail("rl.mini_batches", rl.mini_batches, f"must divide rl.prompts_per_step * rl.group_size = {n}")
    if rl.micro_batches and (n // rl.mini_batches) % rl.micro_batches:
        _fail("rl.micro_batches", rl.micro_batches, f"must divide the mini-batch of {n // rl.mini_batches} sequences "
                                                    f"(rl.prompts_per_step * rl.group_size / rl.mini_batches)")
    if 2 ** (rl.length_buckets - 1) > rl.max_new_tokens:
        _fail("rl.length_buckets", rl.length_buckets, f"must be <= 1 + log2(rl.max_new_tokens = "
                                                      f"{rl.max_new_tokens}): the shortest bucket holds >= 1 token")
    validate_processes(cfg.mesh)
    processes = 1
    if num_devices is None:  # the devices of every process (tsched.multihost.initialize ran before)
        import jax

        num_devices, processes = jax.device_count(), jax.process_count()
    from tsched import sharding

    try:
        data, fsdp, _ = sharding.mesh_shape(cfg.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for field in ("rl.prompts_per_step", "sft.batch_size"):
        if _get(cfg, field) % (data * fsdp):  # batches are split by rows over these two axes
            _fail(field, _get(cfg, field), f"must be a multiple of mesh.data x mesh.fsdp ({data} x {fsdp})")
    for field in ("rl.prompts_per_step", "sft.batch_size", "eval.batch_size"):
        if _get(cfg, field) % processes:  # each process reads (and scores) its share of the rows
            _fail(field, _get(cfg, field), f"must be a multiple of the {processes} processes")


def validate_processes(mesh) -> None:
    """The multi-host fields `mesh.num_processes` / `process_id` / `coordinator` (needed before JAX starts,
    see tsched.multihost.initialize)."""
    n, pid, where = mesh.get("num_processes", 0), mesh.get("process_id", -1), mesh.get("coordinator", "")
    for field, value, low, what in (("mesh.num_processes", n, 0, "must be >= 1, or 0 to detect"),
                                    ("mesh.process_id", pid, -1, "must be >= 0, or -1 to detect")):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(field, value, what)
    if n > 1 and not 0 <= pid < n:
        _fail("mesh.process_id", pid, f"must be in [0, {n}) with mesh.num_processes = {n}")
    if n > 1 and not re.fullmatch(r"[^\s:]+:\d+", where):
        _fail("mesh.coordinator", where, f"must be host:port (process 0's address) with mesh.num_processes = {n}")
    if n == 1 and pid > 0:
        _fail("mesh.process_id", pid, "must be 0 or -1 with mesh.num_processes = 1")


def _validate_data(cfg) -> None:
    """Template and file-source fields; reads no data file (sources report bad records on opening)."""
    from tsched.data import sources, templates

    d = cfg.data
    if d.template not in templates.NAMES and "{problem}" not in d.template:
        _fail("data.template", d.template, f"must be one of {list(templates.NAMES)} or a string containing {{problem}}")
    if d.source == "tasks":
        return
    for field in ("train_files", "eval_files"):
        try:
            sources.parse_spec(d[field])
        except ValueError as e:
            _fail(f"data.{field}", d[field], f"data.source={d.source!r} needs a file spec ({e})")
    if not d.fields.problem or not d.fields.answer:
        _fail("data.fields.problem" if not d.fields.problem else "data.fields.answer", "", "must name a field")


def _validate_init_from(cfg) -> None:
    """`model.init_from` is an HF directory with a supported config.json, a tokenizer unless
    `tokenizer.model_path` gives one, and dimensions a `model.preset` (if set) agrees with."""
    m = cfg.model
    if not m.init_from:
        return
    config_json = os.path.join(m.init_from, "config.json")
    if not os.path.isfile(config_json):
        _fail("model.init_from", m.init_from, "must be a Hugging Face checkpoint directory with config.json"
              + ("" if os.path.isdir(m.init_from) else " (no such directory)"))
    import json

    from tsched.model import hf, presets

    try:
        got = hf.config_from_hf(json.load(open(config_json)))
    except (ValueError, KeyError) as e:
        _fail("model.init_from", m.init_from, f"config.json: {e}")
    if m.preset:
        want = presets.PRESETS[m.preset]
        dims = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
        diff = {k: (getattr(want, k), getattr(got, k)) for k in dims if getattr(want, k) != getattr(got, k)}
        if diff:
            _fail("model.preset", m.preset, f"conflicts with model.init_from's config.json (preset, checkpoint: "
                  f"{diff}); leave model.preset empty with init_from")
    if not cfg.tokenizer.model_path and not os.path.isfile(os.path.join(m.init_from, "tokenizer.json")):
        _fail("model.init_from", m.init_from, "has no tokenizer.json; set tokenizer.model_path")


def tokenizer_path(cfg) -> str:
    """The tokenizer file the run uses: `tokenizer.model_path`, else `<model.init_from>/tokenizer.json`,
    else "" (train a sentencepiece model on the task corpus)."""
    if cfg.tokenizer.model_path:
        return cfg.tokenizer.model_path
    return os.path.join(cfg.model.init_from, "tokenizer.json") if cfg.model.init_from else ""


def chat_template_dir(cfg) -> str:
    """Where `data.template=chat` finds the chat template: the checkpoint, else the tokenizer's directory."""
    return cfg.model.init_from or os.path.dirname(os.path.abspath(cfg.tokenizer.model_path or "."))


def _vocab_size(cfg) -> int:
    """The vocabulary the run will have, as far as the config tells without building anything."""
    if cfg.model.init_from:
        import json

        return json.load(open(os.path.join(cfg.model.init_from, "config.json")))["vocab_size"]
    if cfg.model.preset:
        from tsched.model import presets

        return presets.PRESETS[cfg.model.preset].vocab_size
    if cfg.tokenizer.model_path:
        from tsched.data import tokenizer

        return tokenizer.load(cfg.tokenizer.model_path).vocab_size
    return cfg.tokenizer.vocab_size
