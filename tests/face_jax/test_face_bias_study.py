"""The study's arms build valid configs; the gate and the verdict follow the reading rule;
the report writes its table and figures."""

import json
import sys

import numpy as np
import pytest

from face_jax import steps as steps_lib
from face_jax import synthetic_task
from face_jax.data import synthetic
from face_jax.experiments import bias_study


def _result(arm, seed, worst, groups=None, history=True):
  groups = groups or [0.95, 0.9, worst]
  scores = {f"acc_group{g}": v for g, v in enumerate(groups)}
  scores.update(acc_worst_group=min(groups), group_gap=max(groups) - min(groups), acc_pose=0.9,
                acc_occlusion=0.85, acc_blur=0.88, acc_clean=0.93, acc_group2_blur=worst - 0.01)
  hist = [{"step": s, "margin_met_group0": 0.5 + s / 1000, "margin_met_group2": 0.2 + s / 2000,
           "margin_group0": -0.01 * s / 100} for s in (100, 200)] if history else []
  return {"arm": arm, "seed": seed, "steps": 200, "scores": scores, "history": hist,
          "train_s": 1.0, "cpu_s": 2.0}


def test_every_arm_builds_a_valid_config():
  context = {"mvcom": {"margins": {"group": [0.1, -0.2, 0.35], "pose": [0.0], "occlusion": [0.05],
                                   "blur": [0.2], "class": [0.05]}}}
  bias_study.ARMS["fixed_best"] = bias_study._fixed({"group": (0.0, 0.1, 0.2)})
  try:
    for arm in [*bias_study.ARMS, *bias_study.CONTROL_ARMS]:
      c = bias_study.make_config(arm, 3, "joint_bias", 50, ["data.jitter=0.3"], context)
      steps_lib.check_config(c)
      assert c.seed == 3 and c.total_steps == 50 and c.data.jitter == 0.3, arm
      # The data side accepts it too (samplers, meta split); no image is rendered.
      synthetic_task.SyntheticBatches(c, synthetic.SyntheticFaces(c.data, c.seed),
                                      steps_lib.uses_meta_batch(c))
  finally:
    bias_study.ARMS["fixed_best"] = None
  c = bias_study.make_config("mvcom_frozen", 0, "joint_bias", 0, (), context)
  assert c.mvcom.frozen and dict(c.mvcom.init_offsets)["group"][2] < c.mvcom.bound
  assert bias_study.make_config("mvcom_unbalanced_meta", 0, "joint_bias", 0).data.meta_ids_by_group[0] > 4
  assert bias_study.make_config("fixed[minority-]", 0, "joint_bias", 0).fixed_margins.group[2] < 0
  with pytest.raises(ValueError, match="fixed_best"):
    bias_study.make_config("fixed_best", 0, "joint_bias", 0)


def test_gate_needs_one_sign_and_two_points_on_three_seeds():
  base = [_result("cosface", s, 0.80) for s in range(3)]
  passing = [_result("fixed[minority+]", s, 0.80 + d) for s, d in enumerate((0.025, 0.03, 0.021))]
  mixed = [_result("fixed[minority-]", s, 0.80 + d) for s, d in enumerate((0.03, -0.03, 0.03))]
  small = [_result("fixed[majority-]", s, 0.80 + d) for s, d in enumerate((0.03, 0.015, 0.03))]
  gates = bias_study.gate(base + passing + mixed + small)
  assert gates["fixed[minority+]"][0] and not gates["fixed[minority-]"][0]
  assert not gates["fixed[majority-]"][0]
  np.testing.assert_allclose(gates["fixed[minority+]"][1], [2.5, 3.0, 2.1], atol=1e-9)
  assert not bias_study.gate(base[:2] + passing[:2])["fixed[minority+]"][0]   # < 3 seeds
  assert bias_study.best_control(base + passing + mixed) == bias_study.CONTROL["minority+"]


def test_verdict_follows_the_reading_rule():
  base = [_result("cosface", s, 0.80) for s in range(5)]
  control = [_result("fixed[minority+]", s, 0.83) for s in range(5)]
  assert bias_study.verdict(base, bias_study.gate(base)).startswith("NO VERDICT:")
  results = base + control
  gates = bias_study.gate(results)
  up = [_result("mvcom", s, 0.80 + d) for s, d in enumerate((0.02, 0.025, 0.018, 0.03, 0.022))]
  flat = [_result("mvcom", s, 0.80 + d) for s, d in enumerate((0.001, -0.002, 0.0, 0.002, -0.001))]
  noisy = [_result("mvcom", s, 0.80 + d) for s, d in enumerate((0.04, -0.03, 0.05, -0.02, 0.01))]
  assert "consistent with the paper" in bias_study.verdict(results + up, gates)
  assert "not consistent" in bias_study.verdict(results + flat, gates)
  assert "inconclusive" in bias_study.verdict(results + noisy, gates)
  assert "NO VERDICT YET" in bias_study.verdict(results + up[:4], gates)


def test_report_writes_table_and_figures(tmp_path):
  results = ([_result("cosface", s, 0.80) for s in range(3)]
             + [_result("fixed[minority+]", s, 0.83) for s in range(3)]
             + [_result("mvcom", s, 0.81) for s in range(3)])
  text = bias_study.report(results, str(tmp_path))
  assert text.index("Reading rule") < text.index("worst-CosFace")     # the rule before numbers
  assert "+3.00" in text and "PASSES" in text and "NO VERDICT YET" in text
  assert "group2_blur" in text
  for name in ("control.png", "groups.png", "binding.png", "margins.png"):
    assert (tmp_path / name).stat().st_size > 0


def test_table_spreads_are_sample_std_like_the_verdict():
  worst = (0.80, 0.82, 0.78)
  paired = (0.01, -0.02, 0.04)
  results = ([_result("cosface", s, w) for s, w in enumerate(worst)]
             + [_result("mvcom", s, w + d) for s, (w, d) in enumerate(zip(worst, paired))])
  row = next(line for line in bias_study.table(results).splitlines() if line.startswith("mvcom"))
  # worst column: 100 * (0.81, 0.80, 0.82); paired: 100 * paired, both with n - 1
  assert f"{81.00:6.2f}±{np.std([81, 80, 82], ddof=1):4.2f}" in row
  assert f"{1.00:+6.2f}±{np.std([1, -2, 4], ddof=1):4.2f}" in row


def test_run_arm_trains_and_records_history():
  from face_tiny import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config("cosface")
  config.total_steps = 4
  config.mesh.update(data=-1, fsdp=1, model=1)
  r = bias_study.run_arm("cosface", config, log_every=2, verbose=False)
  assert [h["step"] for h in r["history"]] == [2, 4]
  assert {"margin_met_group0", "p_target_group2", "loss"} <= set(r["history"][-1])
  assert 0.4 < r["scores"]["acc_worst_group"] <= 1 and r["cpu_s"] > 0


def test_pair_similarity_is_cosine_of_genuine_and_impostor_pairs():
  # Unit vectors at angles 0, 60 and 90 degrees to a reference: squared distances 0, 1, 2.
  results = {"group0": {"dist": np.array([0.0, 1.0, 2.0, 1.0]),
                        "issame": np.array([True, True, False, False])}}
  sim = bias_study.pair_similarity(results)["group0"]
  np.testing.assert_allclose([sim["genuine_mean"], sim["genuine_std"]], [0.75, 0.25])
  np.testing.assert_allclose([sim["impostor_mean"], sim["impostor_std"]], [0.25, 0.25])


def test_code_ceiling_falls_with_jitter():
  def ceiling(jitter):
    c = bias_study.make_config("cosface", 0, "joint_bias", 0, [f"data.jitter={jitter}"])
    c.data.update(num_train_ids=60, test_ids_per_group=20, test_images_per_id=4, pairs_per_cell=400,
                  meta_ids_per_group=2, image_size=8, frequencies=3)
    return bias_study.code_ceiling(c)
  tight, loose = ceiling(0.05), ceiling(2.0)
  assert tight["acc_group0"] > 0.97 and loose["acc_group0"] < tight["acc_group0"] - 0.1
  assert set(tight) >= {"acc_group0", "acc_group2", "acc_clean", "acc_group1_blur"}


def test_tight_world_is_joint_bias_with_tighter_identities():
  joint = bias_study.make_config("cosface", 0, "joint_bias", 0).to_dict()
  tight = bias_study.make_config("cosface", 0, "tight", 0).to_dict()
  changed = {k for k in joint["data"] if joint["data"][k] != tight["data"][k]}
  assert changed == {"jitter", "group_spread"}
  assert tight["data"]["jitter"] < joint["data"]["jitter"]
  assert all(t <= j for t, j in zip(tight["data"]["group_spread"], joint["data"]["group_spread"]))
  assert {k: v for k, v in joint.items() if k != "data"} == {k: v for k, v in tight.items() if k != "data"}


def test_nuisance_world_is_tight_with_a_learnable_nuisance():
  tight = bias_study.make_config("cosface", 0, "tight", 0).to_dict()
  nuisance = bias_study.make_config("cosface", 0, "nuisance", 0).to_dict()
  changed = {k for k in tight["data"] if tight["data"][k] != nuisance["data"][k]}
  assert changed == {"nuisance_dim"} and nuisance["data"]["nuisance_dim"] > 0
  assert {k: v for k, v in tight.items() if k != "data"} == {k: v for k, v in nuisance.items() if k != "data"}


def test_report_stage_rewrites_the_readme_section(tmp_path, monkeypatch):
  results = tmp_path / "runs"
  results.mkdir()
  for r in ([_result("cosface", s, 0.80) for s in range(3)]
            + [_result("fixed[minority-]", s, 0.77) for s in range(3)]):
    (results / f"{r['arm']}_seed{r['seed']}.json").write_text(json.dumps(r))
  readme = tmp_path / "README.md"
  readme.write_text("prose\n<!-- mvcom:begin -->\nold table\n<!-- mvcom:end -->\nmore prose\n")
  monkeypatch.setattr(sys, "argv", ["bias_study", "--stage=report", f"--results={results}",
                                    f"--out_dir={tmp_path / 'figs'}", f"--readme={readme}"])
  bias_study.main()
  text = readme.read_text()
  assert text.startswith("prose\n<!-- mvcom:begin -->\n```\n") and text.endswith("more prose\n")
  assert "old table" not in text and "Reading rule" not in text
  assert "control fixed[minority-]: worst group - CosFace per seed -3.00, -3.00, -3.00  PASSES" in text
  assert "[control.png](figs/control.png)" in text


def test_stage_all_runs_the_control_then_the_arms_with_the_best_passing_control(tmp_path, monkeypatch):
  trained = []

  def fake_run_arm(arm, config):
    trained.append((arm, config.seed, config.method, tuple(config.fixed_margins.group)))
    r = _result(arm, config.seed, 0.83 if config.fixed_margins.group[2] == 0.3 else 0.80)
    if arm == "mvcom":
      r["margins"] = {"group": [0.0, 0.05, 0.1]}
    return r

  monkeypatch.setattr(bias_study, "run_arm", fake_run_arm)
  monkeypatch.setitem(bias_study.ARMS, "fixed_best", None)
  monkeypatch.setattr(sys, "argv", ["bias_study", "--stage=all", "--seeds=0,1,2",
                                    f"--results={tmp_path}", "--world=joint_bias"])
  bias_study.main()
  arms = [a for a, *_ in trained]
  assert len(trained) == 3 * (len(bias_study.CONTROL_ARMS) + len(bias_study.ARMS))
  assert max(arms.index(a) for a in bias_study.CONTROL_ARMS) < min(
      i for i, a in enumerate(arms) if a in bias_study.ARMS and a != "cosface")
  assert {g for a, _, _, g in trained if a == "fixed_best"} == {bias_study.CONTROL["minority+"]["group"]}
  assert len(list(tmp_path.glob("*_seed*.json"))) == len(trained)
  bias_study.main()                      # everything is there: nothing is trained again
  assert len(trained) == 3 * (len(bias_study.CONTROL_ARMS) + len(bias_study.ARMS))
