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


def _grounding(itm_layer: int, itm_test: float, itc_block: int, itc_test: float) -> dict:
  return dict(step=100, itm=dict(layer=itm_layer, val_acc=50.0, test_acc=itm_test),
              itc=dict(layer=itc_block, val_acc=50.0, test_acc=itc_test),
              test_largest_acc=8.0, test_random_acc=14.5, metrics={})


def _write_downstream(out, arm, seed, task, summary):
  with open(os.path.join(claims.run_dir(str(out), arm, seed), claims.DOWNSTREAM[task]), "w") as f:
    json.dump(summary, f)


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
  launched, downstream = [], []

  def fake_launch(out, arm, seed, args):
    launched.append((arm, seed))
    result = dict(_result(arm, seed, 20.0), process=dict(wall_s=1.0, cpu_s=2.0))
    _write(out, arm, seed, result)
    return result

  def fake_downstream(out, arm, seed, task, result, root):
    downstream.append((arm, seed, task))
    summary = _grounding(2, 40.0, 2, 45.0)
    _write_downstream(out, arm, seed, "grounding", summary)
    return dict(summary, process=dict(wall_s=1.0, cpu_s=2.0))
  monkeypatch.setattr(claims, "launch", fake_launch)
  monkeypatch.setattr(claims, "run_downstream", fake_downstream)
  claims.main([f"--out={tmp_path}", "--arms=simla,albef", "--seeds=0,1"])
  assert launched == [("simla", 0), ("simla", 1), ("albef", 1)]
  # Grounding (the default downstream) of every finished run, once.
  assert sorted(downstream) == [("albef", 0, "grounding"), ("albef", 1, "grounding"),
                                ("simla", 0, "grounding"), ("simla", 1, "grounding")]
  claims.main([f"--out={tmp_path}", "--arms=simla,albef", "--seeds=0,1"])
  assert len(launched) == 3 and len(downstream) == 4              # nothing left to run
  assert (tmp_path / "claims.md").exists() and (tmp_path / "compute.png").exists()
  # --downstream_only trains nothing (seed 2 has no run) and grounds what finished.
  _write(tmp_path, "itm", 0, _result("itm", 0, 5.0))
  claims.main([f"--out={tmp_path}", "--arms=itm,simla", "--seeds=0,2", "--downstream_only"])
  assert len(launched) == 3 and downstream[-1] == ("itm", 0, "grounding")
  with pytest.raises(SystemExit):
    claims.main([f"--out={tmp_path}", "--downstream=grounding,vqa"])


def test_report_on_made_up_runs(tmp_path):
  results = {}
  for seed, noise in enumerate((0.0, 0.5, -0.5)):
    for arm, test in (("itm", 5.0), ("itc", 15.0), ("mlm", 16.0), ("mim", 16.0 + 2 * noise),
                      ("simla", 20.0), ("albef", 18.0)):
      flops = 2e9 if arm == "simla" else 1e9
      results.setdefault(arm, {})[seed] = _result(arm, seed, test + noise, flops=flops)
  text = claims.report(results)
  main_table = text[:text.index("Downstream")]
  rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in main_table.splitlines()
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
  claims.main([f"--out={tmp_path}", "--arms=dvae", "--seeds=0", "--dvae_n_hid=8",
               "--downstream="])
  (cmd,) = commands
  flags = dict(a.split("=", 1) for a in cmd if a.startswith("--"))
  assert flags["--run_one"] == "dvae" and flags["--dvae_n_hid"] == "8"
  # The child's config reads the written weights (same width).
  c = claims.arm_config("dvae", 0, dvae_weights=flags["--dvae_weights"], dvae_n_hid=8)
  from simla_jax.data import dvae
  dvae.load_encoder_params(c.data.mim.dvae_weights, c.data.mim)
  assert "random-weight dVAE" in (tmp_path / "claims.md").read_text()


# --------------------------------------------------------------------------- downstream
def test_layers_are_chosen_on_val_and_test_is_read_there():
  metrics = {"val_itm0_acc": 30.0, "val_itm1_acc": 45.0, "val_itm2_acc": 40.0,
             "test_itm0_acc": 60.0, "test_itm1_acc": 41.0, "test_itm2_acc": 50.0,
             "val_itc0_acc": 20.0, "val_itc1_acc": 35.0, "val_itc2_acc": 35.0,
             "test_itc0_acc": 22.0, "test_itc1_acc": 33.0, "test_itc2_acc": 31.0,
             "val_itm_acc": 40.0, "val_itc_acc": 35.0}     # headline keys are not layers
  itm = claims.select_layer(metrics, "itm")
  assert (itm["layer"], itm["val_acc"], itm["test_acc"]) == (1, 45.0, 41.0)   # not test's best
  assert itm["layers"] == [0, 1, 2]
  assert claims.select_layer(metrics, "itc")["layer"] == 2        # a val tie: the deeper
  # ALBEF: its text layer has no cross-attention map, so only fusion layers 1-2 are scored.
  albef = {k: v for k, v in metrics.items() if not k.endswith("itm0_acc")}
  albef.update(val_itm2_acc=50.0)
  assert claims.select_layer(albef, "itm")["layers"] == [1, 2]
  assert claims.select_layer(albef, "itm")["test_acc"] == 50.0
  with pytest.raises(ValueError, match="no val_itm<k>_acc"):
    claims.select_layer({"val_itm_acc": 1.0}, "itm")


def test_summaries_of_the_downstream_metrics():
  metrics = {f"{split}_{m}{k}_acc": 10.0 * k + (split == "test") for split in ("val", "test")
             for m in ("itm", "itc") for k in range(3)}
  metrics.update(test_largest_acc=8.0, test_random_acc=14.5)
  g = claims.grounding_summary(metrics, 1000)
  assert (g["itm"]["layer"], g["itm"]["test_acc"], g["step"]) == (2, 21.0, 1000)
  rows = [{"step": 250, "eval/val_acc": 60.0},
          {"step": 1500, "eval/val_acc": 70.0, "eval/test_acc": 68.0,
           "eval/test_majority_acc": 33.3}]
  ve = claims.ve_summary(rows)
  assert (ve["step"], ve["test_acc"], ve["val_acc"]) == (1500, 68.0, 70.0)
  with pytest.raises(ValueError, match="no eval/test_acc"):
    claims.ve_summary(rows[:1])


def test_downstream_columns_on_made_up_runs():
  results = {}
  for seed, noise in enumerate((0.0, 0.5, -0.5)):
    for arm, itm, itc in (("simla", 45.0, 40.0), ("albef", 35.0, 40.0 + 2 * noise)):
      r = _result(arm, seed, 20.0)
      r["grounding"] = _grounding(2 if arm == "simla" else 1 + seed % 2, itm + noise, 2,
                                  itc + noise)
      results.setdefault(arm, {})[seed] = r
  results["itm"] = {0: _result("itm", 0, 5.0)}                   # no downstream file
  results["simla"][0]["ve"] = {"test_acc": 70.0}
  results["albef"][0]["ve"] = {"test_acc": 66.0}
  text = claims.report(results)
  table = text[text.index("| arm | grounding seeds"):]
  rows = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")
          for line in table.splitlines() if line.startswith("| ") and "arm" not in line}
  assert rows["ALBEF"][1:5] == ["0,1,2", "35.0 ± 0.5", "1,2,1", "-10.0 ± 0.0 (lower)"]
  assert rows["ALBEF"][5:8] == ["40.0 ± 1.5", "2,2,2", "0.0 ± 1.0 (within noise)"]
  assert rows["ALBEF"][8:] == ["0", "66.0", "-4.0 (1 seed)"]
  assert rows["+PSL = SIMLA"][4] == "–" and rows["+PSL = SIMLA"][3] == "2,2,2"
  assert rows["ITM"][1:] == ["–"] * 10                            # blanks, no error
  assert "a random proposal 14.5 %, the largest proposal 8.0 %" in text
  assert "verdicts stay on test R@1" in text


def test_report_only_reads_the_cached_downstream_files(tmp_path, monkeypatch):
  monkeypatch.setattr(claims, "run_downstream", lambda *a: pytest.fail("ran a downstream task"))
  for seed in (0, 1):
    _write(tmp_path, "simla", seed, _result("simla", seed, 20.0))
  _write_downstream(tmp_path, "simla", 0, "grounding", _grounding(1, 44.0, 2, 39.0))
  claims.main([f"--out={tmp_path}", "--report_only"])
  results = claims.load_results(str(tmp_path))
  assert results["simla"][0]["grounding"]["itm"]["layer"] == 1
  assert "grounding" not in results["simla"][1]
  assert "| +PSL = SIMLA | 0 | 44.0 | 1 | – | 39.0 | 2 | – | – | – | – |" in (
      tmp_path / "claims.md").read_text()


def test_run_downstream_evaluates_the_runs_checkpoint_once(tmp_path, monkeypatch):
  result = _result("albef", 0, 15.0, steps=1000)
  _write(tmp_path, "albef", 0, result)
  os.makedirs(os.path.join(claims.run_dir(str(tmp_path), "albef", 0), "checkpoints"))
  commands = []

  def fake_call(cmd, stdout, stderr, cwd):
    commands.append(cmd)
    flags = dict(a.split("=", 1) for a in cmd if a.startswith("--"))
    metrics = {f"eval/{split}_{m}{k}_acc": 10.0 * k for split in ("val", "test")
               for m, ks in (("itm", (1, 2)), ("itc", (0, 1, 2))) for k in ks}
    metrics.update({"eval/test_largest_acc": 8.0, "eval/test_random_acc": 14.5})
    with open(os.path.join(flags["--workdir"], "metrics.jsonl"), "w") as f:
      f.write(json.dumps(dict(step=1000, **metrics)) + "\n")
    return 0
  monkeypatch.setattr(claims.subprocess, "call", fake_call)
  g = claims.run_downstream(str(tmp_path), "albef", 0, "grounding", result)
  (cmd,) = commands
  flags = dict(a.split("=", 1) for a in cmd if a.startswith("--"))
  assert cmd[1].endswith("run.py") and flags["--config"] == "configs/simla_grounding.py"
  assert flags["--config.eval_only"] == "True" and flags["--config.grounding.all_layers"] == "True"
  # The run dir has no config.json: a view holds the run's config and links its checkpoints.
  init = flags["--config.init.checkpoint"]
  assert init == os.path.join(claims.downstream_dir(str(tmp_path), "albef", 0), "init")
  with open(os.path.join(init, "config.json")) as f:
    config = json.load(f)
  assert config["model"]["architecture"] == "albef" and config["total_steps"] == 1000
  assert os.path.realpath(os.path.join(init, "checkpoints")) == os.path.realpath(
      os.path.join(claims.run_dir(str(tmp_path), "albef", 0), "checkpoints"))
  assert (g["itm"]["layer"], g["itm"]["test_acc"], g["itc"]["layer"]) == (2, 20.0, 2)
  assert claims.load_results(str(tmp_path))["albef"][0]["grounding"]["itm"]["layer"] == 2
  again = claims.run_downstream(str(tmp_path), "albef", 0, "grounding", result)
  assert len(commands) == 1 and again["itm"] == g["itm"]            # cached
  assert "--config=configs/simla_ve.py" in claims.downstream_command("ve", init, "/w")
