"""The claims study: arm configs, resume / skip, and its report on made-up runs."""

import json
import os

import pytest

from simla_jax.experiments import claims


def _metrics(test: float, comp: float = 10.0) -> dict:
  return {"test_tr_r1": test + 1.0, "test_ir_r1": test - 1.0, "comp_tr_r1": comp,
          "comp_ir_r1": comp, "val_tr_r1": test, "val_ir_r1": test,
          "test_itc_tr_r1": test, "test_itc_ir_r1": test}


def _result(arm: str, seed: int, test: float, flops: float = 1e9, steps: int = 100) -> dict:
  curve = [dict(step=s, flops=flops * s, train_wall_s=s / 10.0, train_cpu_s=s / 5.0,
                **_metrics(test * s / steps)) for s in (25, 50, 75, 100)]
  return dict(arm=arm, seed=seed, steps=steps, flops_per_step=flops, final=curve[-1],
              curve=curve, mim_target="random_projection", dvae_weights="")


def _write(out, arm, seed, result):
  d = claims.run_dir(str(out), arm, seed)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "result.json"), "w") as f:
    json.dump(result, f)


def test_ablation_arms_switch_objectives_off_in_the_papers_order():
  weights = {a: {k: v for k, v in claims.arm_config(a, 0).loss_weights.items() if v}
             for a in claims.ABLATION}
  assert [sorted(w) for w in weights.values()] == [
      ["itm"], ["itc", "itm"], ["itc", "itm", "mlm"], ["itc", "itm", "mim", "mlm"],
      ["itc", "itm", "mim", "mlm", "psl"]]
  albef = claims.arm_config("albef", 2, steps=40)
  assert albef.model.architecture == "albef" and albef.seed == 2
  assert albef.loss_weights.mim == albef.loss_weights.psl == 0.0
  assert (albef.total_steps, albef.eval_every_steps) == (40, 10)
  assert tuple(albef.eval.splits) == ("val", "test", "comp", "strict")


def test_dvae_arm_uses_the_half_resolution_view():
  c = claims.arm_config("dvae", 0, dvae_weights="/x/random.npz", dvae_n_hid=32)
  assert c.data.mim.target == "dvae" and c.data.mim.dvae_weights == "/x/random.npz"
  assert c.data.mim.dvae_image_size == c.data.image_size // 2 and c.data.mim.dvae_n_hid == 32
  assert claims.arm_config("simla", 0).data.mim.target == "random_projection"
  with pytest.raises(ValueError, match="dvae_weights"):
    claims.arm_config("dvae", 0)
  with pytest.raises(ValueError, match="unknown arm"):
    claims.arm_config("blip", 0)


def test_finished_runs_are_skipped(tmp_path):
  _write(tmp_path, "simla", 0, _result("simla", 0, 20.0))
  os.makedirs(claims.run_dir(str(tmp_path), "simla", 1))       # started, unfinished
  assert claims.pending_runs(str(tmp_path), ["simla", "albef"], [0, 1]) == [
      ("simla", 1), ("albef", 0), ("albef", 1)]


def test_main_launches_only_pending_runs(tmp_path, monkeypatch):
  _write(tmp_path, "albef", 0, _result("albef", 0, 15.0))
  launched = []

  def fake_launch(out, arm, seed, args):
    launched.append((arm, seed))
    result = dict(_result(arm, seed, 20.0), process=dict(wall_s=1.0, cpu_s=2.0))
    _write(out, arm, seed, result)
    return result
  monkeypatch.setattr(claims, "launch", fake_launch)
  claims.main([f"--out={tmp_path}", "--arms=simla,albef", "--seeds=0"])
  assert launched == [("simla", 0)]
  claims.main([f"--out={tmp_path}", "--arms=simla,albef", "--seeds=0"])
  assert launched == [("simla", 0)]                               # nothing left to run
  assert (tmp_path / "claims.md").exists() and (tmp_path / "compute.png").exists()


def test_report_on_made_up_runs(tmp_path):
  results = {}
  for seed, noise in enumerate((0.0, 0.5, -0.5)):
    for arm, test in (("itm", 5.0), ("itc", 15.0), ("mlm", 16.0), ("mim", 16.0 + 2 * noise),
                      ("simla", 20.0), ("albef", 18.0)):
      flops = 2e9 if arm == "simla" else 1e9
      results.setdefault(arm, {})[seed] = _result(arm, seed, test + noise, flops=flops)
  text = claims.report(results)
  rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
          if line.startswith("| ") and "arm" not in line}
  assert rows["ITM"][5] == "5.0 ± 0.5"                            # test R@1 over 3 seeds
  assert rows["ALBEF"][6] == "-2.0 ± 0.0 (lower)"                 # paired vs SIMLA
  assert rows["+PSL = SIMLA"][6] == "–"
  assert rows["+PSL = SIMLA"][11] == "2.0" and rows["ALBEF"][11] == "1.0"   # GFLOPs / step
  # +MLM -> +MIM is within noise: claim 1 is not shown; SIMLA > ALBEF in every seed.
  assert "Claim 1 (every added objective helps): **not shown" in text
  assert "Claim 2 (SIMLA beats ALBEF at the same data and steps): **holds**" in text
  # At equal compute (ALBEF's final 100 GFLOPs = SIMLA's step 50) SIMLA is at 10 vs 18.
  assert "Claim 3" in text and "**does not hold (ALBEF higher): at 0.1 TFLOPs" in text
  assert set(claims.plots(results, str(tmp_path))) == {
      str(tmp_path / "ablation.png"), str(tmp_path / "compute.png")}


def test_partial_study_says_so():
  results = {"simla": {0: _result("simla", 0, 20.0)}, "albef": {0: _result("albef", 0, 18.0)}}
  v = claims.claim_verdicts(results)
  assert v["1"] == "not run" and v["2"] == "undecided (1 seed)"


def test_runs_of_different_lengths_are_not_paired():
  results = {"simla": {0: _result("simla", 0, 20.0, steps=300)},
             "albef": {0: _result("albef", 0, 18.0, steps=1000)}}
  assert claims.claim_verdicts(results)["2"] == "not run"
  assert "| ALBEF | 0 | 1000 |" in claims.report(results)


def test_dvae_arm_gets_a_random_dvae_that_its_config_loads(tmp_path, monkeypatch):
  commands = []

  def fake_call(cmd, stdout, stderr):
    commands.append(cmd)
    _write(tmp_path, "dvae", 0, _result("dvae", 0, 20.0))
    return 0
  monkeypatch.setattr(claims.subprocess, "call", fake_call)
  claims.main([f"--out={tmp_path}", "--arms=dvae", "--seeds=0", "--dvae_n_hid=8"])
  (cmd,) = commands
  flags = dict(a.split("=", 1) for a in cmd if a.startswith("--"))
  assert flags["--run_one"] == "dvae" and flags["--dvae_n_hid"] == "8"
  # The child's config reads the written weights (same width).
  c = claims.arm_config("dvae", 0, dvae_weights=flags["--dvae_weights"], dvae_n_hid=8)
  from simla_jax.data import dvae
  dvae.load_encoder_params(c.data.mim.dvae_weights, c.data.mim)
  assert "random-weight dVAE" in (tmp_path / "claims.md").read_text()
