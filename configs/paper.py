"""The paper's methods on the built-in tasks, as one parameterised config (big_vision's `get_config(arg)`).

    python -m tsched.main --config=configs/paper.py:method=grpo
    python -m tsched.main --config=configs/paper.py:method=forking_schedule --config.seed=1
    python -m tsched.main --config=configs/paper.py:strategy=forking,schedule=sigmoid

Same tasks, model, SFT and budget as configs/default.py (long `chain` traces whose SFT solutions slip;
about 5 minutes of RL each, two runs at a time on 2 CPU cores); only
the credit criterion, its schedule, the prompt transform or the loss differ. `method=` picks a named
row of METHODS; `strategy=`, `schedule=`, `transform=`, `loss=` set those fields directly (after the
method's, so `method=forking,schedule=cosine` is the 80/20 criterion under a cosine schedule). Any
field can still be overridden by flag. Results: one run is one sample; compare methods over seeds
(docs/results.md has what was measured).

    grpo                  every token gets the sequence advantage (the paper's reference point)
    tp_schedule           TP-Schedule: optimize the last percentiles first, widen to the whole response
                          by 80% of training (= configs/default.py)
    forking               static 80/20: per response only the 20% highest-entropy tokens, normalised by
                          all valid tokens as in the 80/20 paper
    forking_schedule      top-entropy subset widening from 1% to all tokens (r: 0.99 -> 0)
    entropy_adv           static entropy-shaped advantage A + min(alpha H, |A| / kappa) (Cheng et al.)
    entropy_adv_schedule  the entropy bonus decaying linearly to plain GRPO
    off_policy_schedule   the prompt carries round(r L) tokens of the reference solution, r decaying
                          (the default tasks' solutions slip: a prefix can carry a slip)
    gspo                  sequence-level importance ratio, seq-mean-token-mean, GSPO's narrow clip range

Neighbouring criteria and several updates per rollout (ratios != 1, so clipping acts):

    minibatch4            GRPO with 4 optimizer steps per rollout batch (DAPO-style mini-batches)
    forking_batch         static 80/20 with a batch-level entropy threshold, as the 80/20 paper
    d3s_schedule          D3S token selection (largest |A| H), sparse to dense under the linear schedule
    empg                  static EMPG: entropy-modulated advantage + future-clarity bonus, per token
    p_trace / s_trace     eligibility-trace ratios (tsched's formalisation) over all / the top-20%-entropy
                          tokens, with 4 mini-batches
    clip_cov / kl_cov     Clip-Cov / KL-Cov on high-covariance tokens, with 4 mini-batches
"""

from tsched.config import base_config

METHODS = {
    "grpo": {"rl.credit.strategy": "uniform"},
    "tp_schedule": {"rl.credit.strategy": "tp", "rl.schedule.mode": "linear"},
    "forking": {"rl.credit.strategy": "forking", "rl.credit.normalizer": "valid_tokens",
                "rl.schedule.mode": "constant", "rl.schedule.initial_magnitude": 0.8},  # keep ceil(0.2 n)
    "forking_schedule": {"rl.credit.strategy": "forking", "rl.schedule.mode": "linear"},
    "entropy_adv": {"rl.credit.strategy": "entropy_adv", "rl.schedule.mode": "constant",
                    "rl.schedule.initial_magnitude": 1.0},
    "entropy_adv_schedule": {"rl.credit.strategy": "entropy_adv", "rl.schedule.mode": "linear"},
    "off_policy_schedule": {"rl.credit.strategy": "uniform", "rl.prompt_transform": "reference_prefix",
                            "rl.schedule.mode": "linear"},
    # Sequence ratios sit much closer to 1 than token ratios, hence the GSPO paper's narrow clip range.
    "gspo": {"rl.credit.strategy": "uniform", "rl.loss": "gspo", "rl.aggregation": "seq-mean-token-mean",
             "rl.clip_low": 3e-4, "rl.clip_high": 4e-4, "rl.dual_clip": 0.0},
}
_MINI = {"rl.mini_batches": 4}
METHODS.update({
    "minibatch4": {"rl.credit.strategy": "uniform", **_MINI},
    "forking_batch": {"rl.credit.strategy": "forking_batch", "rl.credit.normalizer": "valid_tokens",
                      "rl.schedule.mode": "constant", "rl.schedule.initial_magnitude": 0.8},
    "d3s_schedule": {"rl.credit.strategy": "d3s", "rl.schedule.mode": "linear"},
    "empg": {"rl.credit.strategy": "empg", "rl.schedule.mode": "constant", "rl.schedule.initial_magnitude": 1.0},
    "p_trace": {"rl.credit.strategy": "uniform", "rl.loss": "trace", **_MINI},
    "s_trace": {"rl.credit.strategy": "uniform", "rl.loss": "trace", "rl.trace.entropy_top": 0.2, **_MINI},
    "clip_cov": {"rl.credit.strategy": "uniform", "rl.loss": "clip_cov", **_MINI},
    "kl_cov": {"rl.credit.strategy": "uniform", "rl.loss": "kl_cov", **_MINI},
})
KEYS = {"strategy": "rl.credit.strategy", "schedule": "rl.schedule.mode", "transform": "rl.prompt_transform",
        "loss": "rl.loss"}


def parse(arg: str) -> dict:
    """'method=forking,schedule=cosine' -> {field: value} in the order given."""
    out = {}
    for item in filter(None, (s.strip() for s in arg.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in ("method", *KEYS):
            raise ValueError(f"configs/paper.py argument {item!r}: expected key=value with key one of "
                             f"{['method', *KEYS]}")
        if key == "method" and value not in METHODS:
            raise ValueError(f"configs/paper.py method={value!r}: must be one of {list(METHODS)}")
        out.update(METHODS[value] if key == "method" else {KEYS[key]: value})
    return out


def get_config(arg: str = "method=tp_schedule"):
    c = base_config()
    c.run_dir = "runs/" + (arg.replace("method=", "").replace("=", "-").replace(",", "_") or "paper")
    for dotted, value in parse(arg).items():
        *parents, leaf = dotted.split(".")
        section = c
        for p in parents:
            section = section[p]
        section[leaf] = value
    return c
