"""tsched.study: statistics and verdicts (against known values), what a run measured, the report from
synthetic run directories, the run order (fake runs), the command line, and a real smoke study (slow)."""

import json
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from tsched import study as st
from tsched import sweep
from tsched.study import Interval, interval, paired, run_name, t_quantile, verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "studies", "smoke.py")


# ---- Statistics

# Two-sided 95% quantiles of Student's t from printed tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 60: 2.000, 100: 1.984}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(df) == pytest.approx(T975[df], abs=6e-4)


def test_t_quantile_closed_forms_and_other_levels():
    assert t_quantile(1) == pytest.approx(math.tan(0.95 * math.pi / 2), rel=1e-9)  # Cauchy
    q = 0.95  # df 2: P(|T| <= t) = t / sqrt(2 + t^2)
    assert t_quantile(2) == pytest.approx(q * math.sqrt(2 / (1 - q * q)), rel=1e-9)
    assert t_quantile(10, 0.90) == pytest.approx(1.812, abs=6e-4)
    assert t_quantile(5, 0.99) == pytest.approx(4.032, abs=6e-4)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 12])
def test_t_mass_is_the_integral_of_the_density(df):
    """Against numerical integration of the t density (a reference independent of the series)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    for t in (0.3, 1.0, 2.5, 6.0):
        x = np.linspace(-t, t, 200001)
        pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        assert st.t_two_sided_mass(t, df) == pytest.approx(np.trapezoid(pdf, x), abs=1e-8)


def test_interval_is_the_t_interval_of_the_mean():
    iv = interval([1.0, 2.0, 3.0])  # sd 1, n 3: half width t(2) / sqrt(3)
    assert (iv.mean, iv.n) == (2.0, 3)
    assert iv.hi - iv.mean == pytest.approx(4.30265 / math.sqrt(3), rel=1e-5)
    assert iv.mean - iv.lo == pytest.approx(iv.hi - iv.mean)
    assert interval([0.5, float("nan"), None, 1.5]) == interval([0.5, 1.5])  # not-finite values dropped
    one = interval([0.7])
    assert one.n == 1 and one.mean == 0.7 and math.isnan(one.lo) and one.text() == "0.700 (n=1)"
    assert interval([]).n == 0 and interval([]).text() == "-"


def test_paired_differences_use_the_seeds_both_have():
    a, b = {0: 0.5, 1: 0.6, 2: float("nan"), 3: 0.9}, {0: 0.4, 1: 0.7, 2: 0.1, 4: 0.2}
    assert paired(a, b) == pytest.approx({0: 0.1, 1: -0.1})


@pytest.mark.parametrize("lo,hi,n,sign,expected", [
    (0.01, 0.2, 3, +1, "holds"), (-0.2, -0.01, 3, -1, "holds"),
    (-0.2, -0.01, 3, +1, "contradicted"), (0.01, 0.2, 3, -1, "contradicted"),
    (-0.01, 0.2, 3, +1, "inconclusive"), (0.0, 0.2, 3, +1, "inconclusive"),  # touching 0 does not exclude it
    (math.nan, math.nan, 1, +1, "inconclusive"), (math.nan, math.nan, 0, -1, "inconclusive"),
])
def test_verdict(lo, hi, n, sign, expected):
    assert verdict(Interval((lo + hi) / 2, lo, hi, n), sign) == expected


# ---- What one run measured

def rl_rows(steps, entropy, kl=None, evals=None):
    """RL metric rows: entropy(step) for the sequence and each stage, kl(step) -> [10] bins, evals {step: acc}."""
    rows = []
    for step in range(1, steps + 1):
        row = {"phase": "rl", "step": step, "entropy": entropy(step),
               **{k: entropy(step) * f for k, f in zip(st.STAGES, (1.1, 1.0, 0.9))}}
        if kl is not None:
            row.update({f"kl_bin{i}": float(v) for i, v in enumerate(kl(step))})
        if evals and step in evals:
            row["eval/eval/avg@4"] = evals[step]
        rows.append(row)
    return rows


def summary(steps, before, after):
    return {"rl_steps": steps, "eval_per_set_before_rl": {"eval/eval/avg@4": before, "eval/eval/greedy_accuracy": 0.9},
            "eval_per_set_after_rl": {"eval/eval/avg@4": after, "eval/eval/greedy_accuracy": 0.9},
            "eval_accuracy_metric": "avg@4, temperature 1.0", "wall_time_s": 12.0}


def test_run_scalars_from_a_hand_made_run():
    late_kl = np.eye(10)[9]  # all KL in the last bin (centre 95) ... then in the first (centre 5)
    rows = rl_rows(100, entropy=lambda s: 2.0 if s <= 80 else 1.0, kl=lambda s: late_kl if s < 50 else np.eye(10)[0],
                   evals={50: 0.6, 100: 0.4})
    got = st.run_scalars(summary(100, 0.9, 0.4), rows)  # before RL (0.9) is not a "best during RL"
    assert got["start_accuracy"] == 0.9 and got["final_accuracy"] == 0.4 and got["best_accuracy"] == 0.6
    assert got["mean_entropy"] == pytest.approx(1.8) and got["late_entropy"] == 1.0  # steps 81..100
    assert got["kl_centroid_30"] == pytest.approx(95) and got["kl_centroid_80"] == pytest.approx(5)
    assert got["kl_shift"] == pytest.approx(-90)
    assert st.accuracy_curve(summary(100, 0.9, 0.4), rows) == [(0, 0.9), (50, 0.6), (100, 0.4)]


def test_kl_profile_averages_the_steps_near_the_point_and_centroid_weights_percentiles():
    rows = rl_rows(100, entropy=lambda s: 1.0, kl=lambda s: np.full(10, float(s)))
    assert st.kl_profile(rows, 100, 0.3) == pytest.approx(np.full(10, 30.0))  # mean of steps 25..35
    assert st.near(rows, 100, 0.3)[0]["step"] == 25 and st.near(rows, 100, 0.3)[-1]["step"] == 35
    assert [r["step"] for r in st.near(rows[:4], 4, 0.3)] == [1]  # too few steps: the nearest one
    assert st.kl_centroid(np.array([0, 1, 0, 0, 0, 0, 0, 0, 0, 3.0])) == pytest.approx((15 + 3 * 95) / 4)
    assert math.isnan(st.kl_centroid(np.zeros(10)))  # no update moved the policy
    assert np.isnan(st.kl_profile(rl_rows(10, entropy=lambda s: 1.0), 10, 0.3)).all()  # KL not logged


def test_smooth_is_a_trailing_mean():
    x = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    ref = [np.mean(x[max(0, i - 2):i + 1]) for i in range(len(x))]
    assert st.smooth(x, 3) == pytest.approx(ref)
    assert st.smooth(x, 1) == pytest.approx(x)


# ---- Claims and the report from synthetic run directories

METHODS = ("grpo", "tp_schedule", "entropy_adv", "entropy_adv_schedule", "forking", "forking_schedule")
STUDY = st.Study("synthetic", {m: f"configs/paper.py:method={m}" for m in METHODS}, "grpo", (0, 1, 2), {})
UNIFORM, LATE = np.full(10, 0.01), np.linspace(0.0, 0.02, 10)


def scenario(method, seed, tp_gain=0.05):
    """(summary, rows) of one synthetic run: seed effects shared by the methods (what pairing removes),
    TP-Schedule better by tp_gain with higher entropy and KL moving earlier, static entropy_adv collapsing."""
    base = 0.3 + 0.1 * seed
    gain = {"tp_schedule": tp_gain + 0.002 * seed}.get(method, 0.001 * seed)
    level = {"tp_schedule": 1.2, "entropy_adv": 0.3, "entropy_adv_schedule": 0.9}.get(method, 1.0) + 0.05 * seed
    if method == "entropy_adv":
        ent = lambda s: 1.0 + 0.05 * seed if s < 10 else level
    else:
        ent = lambda s: level - 0.002 * s
    kl = (lambda s: LATE if s < 20 else UNIFORM) if method == "tp_schedule" else (lambda s: UNIFORM)
    return summary(40, base - 0.1, base + gain), rl_rows(40, ent, kl, evals={20: base, 40: base + gain})


def write_runs(root, make=scenario, study=STUDY):
    for r in st.plan(study, str(root)):
        s, rows = make(r.method, r.seed)
        d = root / r.run.name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(s))
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [{"phase": "sft", "step": 1}, *rows]))
    return st.plan(study, str(root))


def test_report_tables_claims_and_figures(tmp_path):
    runs = write_runs(tmp_path)
    md = st.report(STUDY, runs, str(tmp_path), {r.run.name: "done" for r in runs})
    assert md == str(tmp_path / "study.md")
    text = open(md).read()
    for f in ("accuracy.png", "entropy.png", "entropy_stages.png", "kl_percentile.png"):
        assert open(tmp_path / f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"]({f})" in text
    assert "| tp_schedule | 3 | 0.300 [0.052, 0.548] |" in text  # seeds 0.2, 0.3, 0.4 before RL
    assert "| tp_schedule | final_accuracy | 0: +0.050, 1: +0.051, 2: +0.052 | +0.051 [+0.049, +0.053] |" in text  # sd 0.001
    claims = [ln for ln in text.splitlines() if ln[:3] in ("1. ", "2. ", "3. ", "4. ")]
    assert [c.split("**")[1] for c in claims] == ["holds"] * 4
    assert text.count("method=") == len(runs)  # the runs table
    out = json.load(open(tmp_path / "study.json"))
    assert [c["verdict"] for c in out["claims"]] == ["holds"] * 4
    shift = out["claims"][3]["tests"][0]
    assert shift["per_seed"]["0"] < -10 and shift["verdict"] == "holds"  # KL moved from late bins to uniform
    assert out["runs"]["tp_schedule"]["1"]["final_accuracy"] == pytest.approx(0.452)
    assert out["versus_baseline"]["entropy_adv"]["late_entropy"]["interval"]["mean"] == pytest.approx(0.3 - (1.0 - 0.002 * 36.5))  # steps 33..40


@pytest.mark.parametrize("tp_gain,expected", [(-0.05, "contradicted"), (0.0, "inconclusive")])
def test_claim_one_is_contradicted_or_inconclusive(tmp_path, tp_gain, expected):
    noisy = lambda m, s: scenario(m, s, tp_gain + (0.03 * (-1) ** s if tp_gain == 0 else 0))
    runs = write_runs(tmp_path, noisy)
    st.report(STUDY, runs, str(tmp_path), {})
    claim = json.load(open(tmp_path / "study.json"))["claims"][0]
    assert claim["verdict"] == expected, claim


def test_judge_needs_every_test_and_names_missing_methods():
    claim = st.CLAIMS[3]  # two tests: TP's own shift, and TP against GRPO
    row = lambda shift: {"kl_shift": shift}
    scalars = {"tp_schedule": {s: row(-10.0 - s) for s in range(3)}, "grpo": {s: row(-10.5 - s) for s in range(3)}}
    got = st.judge(claim, scalars)
    assert [t["verdict"] for t in got["tests"]] == ["holds", "contradicted"] and got["verdict"] == "contradicted"
    scalars["grpo"] = {s: row(-9.0 + (2 * s - 2) ** 2) for s in range(3)}  # diffs -1, -1, -5: still 0 inside
    got = st.judge(claim, scalars)
    assert [t["verdict"] for t in got["tests"]] == ["holds", "inconclusive"] and got["verdict"] == "inconclusive"
    got = st.judge(st.CLAIMS[2], scalars)
    assert got["verdict"] == "not tested (entropy_adv, entropy_adv_schedule not in the study)"


# ---- Runs: plan, checks, order

def test_plan_puts_each_seeds_baseline_first_and_warm_starts_the_others_from_it():
    study = st.Study("s", {"a": "x.py", "base": "y.py"}, "base", (3, 5), {"rl.steps": 7})
    runs = st.plan(study, "R")
    assert [(r.method, r.seed, r.config) for r in runs] == [
        ("base", 3, "y.py"), ("a", 3, "x.py"), ("base", 5, "y.py"), ("a", 5, "x.py")]
    assert runs[1].run == sweep.Run("method=a,seed=3", (("seed", "3"), ("sft.warm_start", os.path.join("R", "method=base,seed=3"))))
    assert runs[0].run.overrides == (("seed", "3"),)
    assert all(len(r.run.overrides) == 1 for r in st.plan(study, "R", share_sft=False))
    assert st.fixed_flags(study, ["--config.rl.steps=9"]) == ["--config.rl.steps=7", "--config.rl.steps=9"]


def test_load_study_checks_the_file(tmp_path):
    assert st.load_study(SMOKE).seeds == (0, 1) and st.load_study(SMOKE, "4,2").seeds == (4, 2)
    for body, needle in [("{'methods': {'a': 'c.py'}, 'baseline': 'b', 'seeds': [0]}", "baseline 'b' is not one"),
                         ("{'methods': {'a': 'c.py'}, 'baseline': 'a', 'seeds': [0, 0]}", "distinct seeds"),
                         ("{'methods': {'a/b': 'c.py'}, 'baseline': 'a/b', 'seeds': [0]}", "method label 'a/b'")]:
        (tmp_path / "s.py").write_text(f"def get_study():\n    return {body}\n")
        with pytest.raises(ValueError, match=needle):
            st.load_study(str(tmp_path / "s.py"))
    with pytest.raises(ValueError, match="--seeds=1,x"):
        st.load_study(SMOKE, "1,x")
    with pytest.raises(ValueError, match="no such file 'configs/studies/nope.py'"):
        st.load_study("nope")


def test_check_refuses_a_method_whose_sft_differs_from_the_baselines(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "wide.py").write_text(  # TP-Schedule with a wider model: its SFT is not GRPO's
        "import runpy\n\ndef get_config():\n    c = runpy.run_path('configs/paper.py')['get_config']('method=tp_schedule')\n"
        "    c.model.d_model = 64\n    return c\n")
    study = st.Study("s", {"grpo": "configs/paper.py:method=grpo", "wide": str(tmp_path / "wide.py")}, "grpo", (0,), {})
    with pytest.raises(ValueError, match=r"run method=wide,seed=0: its SFT would differ.*model\.d_model: 128 -> 64"):
        st.check(study, st.plan(study, str(tmp_path)), [])
    study = st.Study("s", {"grpo": "configs/paper.py:method=grpo", "tp": "configs/paper.py:method=tp_schedule"},
                     "grpo", (0, 1), {"rl.steps": 3})
    assert st.check(study, st.plan(study, str(tmp_path)), []) == 400
    assert st.check(study, st.plan(study, str(tmp_path)), ["--config.sft.steps=0"]) == 0  # no SFT to share
    with pytest.raises(ValueError, match="rl.credit.strategy"):
        st.check(study, st.plan(study, str(tmp_path)), ["--config.rl.credit.strategy=psychic"])


def fake_sft_checkpoint(run_dir, step):
    d = os.path.join(run_dir, "ckpt", "sft", str(step), "state")
    os.makedirs(d)
    open(os.path.join(d, "_METADATA"), "w").close()
    open(os.path.join(d, "..", "_CHECKPOINT_METADATA"), "w").close()


def test_execute_runs_each_seeds_baseline_first_skips_finished_runs_and_reports_failures(tmp_path, monkeypatch, capsys):
    study = st.Study("s", {"base": "b.py", "x": "x.py", "y": "y.py"}, "base", (0, 1, 2), {})
    root = str(tmp_path)
    events, lock = [], threading.Lock()

    def fake_run_one(run, config, fixed, root_, env=None):
        with lock:
            events.append(("start", run.name, dict(run.overrides).get("sft.warm_start")))
        d = os.path.join(root_, run.name)
        os.makedirs(d, exist_ok=True)
        if run.name == "method=base,seed=2":  # fails before its SFT finished
            fake_sft_checkpoint(d, 20)
            return "failed (exit 1)", 0.1
        if run.name.startswith("method=base"):
            fake_sft_checkpoint(d, 30)
        open(os.path.join(d, "summary.json"), "w").write("{}")
        with lock:
            events.append(("end", run.name, None))
        return "done", 0.1

    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    os.makedirs(os.path.join(root, "method=x,seed=1"))
    open(os.path.join(root, "method=x,seed=1", "summary.json"), "w").write("{}")  # finished earlier
    status = st.execute(study, st.plan(study, root), [], root, parallel=2, sft_steps=30)
    assert status == {"method=x,seed=1": "cached", "method=base,seed=0": "done", "method=x,seed=0": "done",
                      "method=y,seed=0": "done", "method=base,seed=1": "done", "method=y,seed=1": "done",
                      "method=base,seed=2": "failed (exit 1)",
                      "method=x,seed=2": f"not run (no SFT checkpoint in {os.path.join(root, 'method=base,seed=2')})",
                      "method=y,seed=2": f"not run (no SFT checkpoint in {os.path.join(root, 'method=base,seed=2')})"}
    order = [(kind, name) for kind, name, _ in events]
    for seed in (0, 1):
        for m in ("x", "y"):
            if ("start", f"method={m},seed={seed}") in order:
                assert order.index(("end", f"method=base,seed={seed}")) < order.index(("start", f"method={m},seed={seed}"))
    warm = {name: w for kind, name, w in events if kind == "start"}
    assert warm["method=y,seed=0"] == os.path.join(root, "method=base,seed=0") and warm["method=base,seed=0"] is None
    out = capsys.readouterr().out
    assert "skip method=x,seed=1: summary.json exists" in out and "[6/8] " in out and ": done in 0 s (" in out


@pytest.mark.parametrize("argv,needle", [
    (["--config.seed=1"], "--seeds"), (["--config.run_dir=x"], "--root"), (["--config.sft.warm_start=x"], "the study"),
    (["--bogus"], "unrecognized"), (["--parallel=0"], "--parallel"), (["--seeds=0,0"], "distinct"),
    (["--config.rl.steps=-1"], "rl.steps"),
])
def test_command_line_errors_exit_2_before_any_run(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        st.main([f"--study={SMOKE}", f"--root={tmp_path / 'r'}", *argv])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")


# ---- A real smoke study

@pytest.mark.slow
@pytest.mark.heavy
def test_smoke_study_writes_the_report_and_a_rerun_skips_finished_runs(tmp_path):
    root = tmp_path / "study"
    cmd = [sys.executable, "-m", "tsched.study", "--study=smoke", f"--root={root}", "--parallel=2",
           f"--config.data.data_dir={tmp_path / 'data'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == str(root / "study.md")
    assert sum(": done in " in ln for ln in lines) == 4
    text = open(root / "study.md").read()
    assert "| grpo | 2 |" in text and "| tp_schedule | 2 |" in text and text.count("](") == 4
    for f in ("accuracy.png", "entropy.png", "entropy_stages.png", "kl_percentile.png"):
        assert open(root / f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.load(open(root / "study.json"))
    assert report["status"] == {run_name(m, s): "done" for s in (0, 1) for m in ("grpo", "tp_schedule")}
    assert report["claims"][2]["verdict"].startswith("not tested")
    assert {c["verdict"] for c in report["claims"][:2] + report["claims"][3:]} <= {"holds", "contradicted", "inconclusive"}
    for seed in (0, 1):  # TP-Schedule started from GRPO's SFT: same parameters, so the same evaluation before RL
        tp, grpo = (json.load(open(root / run_name(m, seed) / "summary.json")) for m in ("tp_schedule", "grpo"))
        assert tp["sft_warm_start"] == str(root / run_name("grpo", seed))
        assert tp["eval_per_set_before_rl"] == grpo["eval_per_set_before_rl"]
        assert tp["eval_before_rl_from"] == tp["sft_warm_start"]  # taken from GRPO's run, not recomputed
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sum(ln.startswith("skip ") for ln in again.stdout.splitlines()) == 4 and "done in" not in again.stdout
