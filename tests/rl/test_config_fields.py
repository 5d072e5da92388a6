"""The rl.credit / rl.trace fields of the criteria and trace losses: defaults valid, bad values named."""

import pytest

from tests.tiny import set_field
from tsched.config import base_config, validate


def test_defaults_are_the_published_ones_and_valid():
    cfg = base_config()
    validate(cfg)
    c = cfg.rl.credit
    assert (c.empg_k, c.empg_k_f, c.empg_zeta) == (1.0, 1.0, 0.1)
    assert (c.clip_cov_ratio, c.clip_cov_lb, c.clip_cov_ub) == (2e-4, 1.0, 5.0)
    assert (c.kl_cov_ratio, c.kl_cov_beta) == (2e-4, 1.0)
    assert cfg.rl.trace.entropy_top == 1.0  # P-trace unless asked


@pytest.mark.parametrize("loss", ["trace", "clip_cov", "kl_cov"])
def test_new_losses_are_allowed(loss):
    cfg = base_config()
    cfg.rl.loss = loss
    validate(cfg)


@pytest.mark.parametrize("field,value", [
    ("rl.credit.d3s_max_drop", 1.5), ("rl.credit.d3s_scope", "group"), ("rl.credit.empg_k", -1.0),
    ("rl.credit.empg_zeta", -0.1),
    ("rl.credit.clip_cov_ratio", 0.0), ("rl.credit.kl_cov_ratio", 2.0), ("rl.credit.kl_cov_beta", -1.0),
    ("rl.credit.clip_cov_ub", 0.5), ("rl.trace.lam", 1.1), ("rl.trace.entropy_top", 0.0),
])
def test_bad_values_name_the_field(field, value):
    cfg = base_config()
    set_field(cfg, field, value)
    with pytest.raises(ValueError, match=field):
        validate(cfg)
