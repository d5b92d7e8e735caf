"""Real DVC on a tiny copy of the project: repro, no-op repro, one param changed, experiments, plots, remote."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CV, MEMBERS, ROOT, TINY_PARAMS, copy_project, make_folder
from pipeline import paths


def test_dvc_yaml_paths_match_the_stages():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = json.dumps(stages)
    for p in (paths.SPLIT_TABLE, paths.SPLIT_SUMMARY, paths.VALIDATE_REPORT, paths.VALIDATE_SUMMARY, paths.CACHE_DIR,
              paths.FEATURES_DIR, paths.FEATURES_BY_BACKBONE, paths.PREDICTIONS_DIR, paths.METRICS / "evaluate.json",
              paths.RECIPE, paths.OOF_TABLE, paths.CV_DIR / "designs", paths.CV_DIR / "bagging"):
        assert str(p) in declared, p
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = body["cmd"].split()[2]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), name
        assert f"{module.replace('.', '/')}.py" in body["deps"], f"{name} does not depend on its own code"


def sh(cmd, cwd, env, check=True):
    out = subprocess.run(cmd, cwd=cwd, env=env, shell=True, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def ran(log: str) -> set:
    return set(re.findall(r"Running stage '([^']+)'", log))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dvc")
    images = make_folder(tmp / "images", per_class=10)
    dest = copy_project(tmp / "project", TINY_PARAMS, images)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PIPELINE_RUN_ID", None)
    sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", dest, env)
    return dest, env, tmp


def test_repro_then_noop_then_one_param(repo):
    dest, env, _ = repo
    first = sh("dvc repro", dest, env)
    all_stages = {"sources", "split", "validate", "cache", "extract", "near_copies", *CV, "label_issues",
                  "learning_curve", "head", "finetune@head", *MEMBERS, "ensemble", "evaluate", "export"}
    assert ran(first) == all_stages
    report = json.loads((dest / "metrics/evaluate.json").read_text())
    assert report["models"]["head"]["test"]["n"] == 4  # 10 per class: 5 train, 3 val, 2 test
    assert report["selected"] in {"head", "finetune", "bagging"} and "cross-validation" in report["selected_by"]
    second = sh("dvc repro", dest, env)
    assert ran(second) == {"sources"}  # it lists the data folder on every repro; nothing changed, nothing follows
    sh("git add -A && git -c user.name=t -c user.email=t@t commit -qm repro", dest, env)
    exp = sh("dvc exp run -S finetune.learning_rate=0.001", dest, env)
    # nothing upstream of fine-tuning reruns; export follows evaluate's report
    assert ran(exp) == {"sources", "finetune@head", "evaluate", "export"}
    shown = json.loads(sh("dvc exp show --json", dest, env))
    tried = [e["data"]["params"]["params.yaml"]["data"]["finetune"]["learning_rate"]
             for row in shown for run in (row.get("experiments") or []) for e in run["revs"]]
    assert 0.001 in tried
    assert "metrics/evaluate.json" in sh("dvc metrics diff --all HEAD", dest, env)
    member = sh("dvc exp run -S 'bagging.members=[1,2]'", dest, env)
    # one more candidate member: its folds, and the choice of how many join the head
    assert ran(member) == {"sources", "bagging@2-0", "bagging@2-1", "ensemble", "evaluate", "export"}
    # MLflow's compare view: one parent per pipeline run, every param under its flattened key, the headline figures
    runs = {(r.data.params["finetune.learning_rate"], r.data.params["bagging.members"]): r
            for r in parent_runs(env["MLFLOW_TRACKING_URI"])}
    repro, exp_lr, exp_members = runs[("0.0003", "[1]")], runs[("0.001", "[1]")], runs[("0.001", "[1, 2]")]
    assert differing(repro, exp_lr) == {"finetune.learning_rate"}
    assert differing(exp_lr, exp_members) == {"bagging.members"}
    for r in (repro, exp_lr, exp_members):
        assert {"test_accuracy", "test_roc_auc", "test_macro_f1", "cv_accuracy", "minutes.all_stages"} <= set(r.data.metrics)
        assert r.data.tags["selected_model"] in {"head", "bagging"} and len(r.data.tags["lineage.git_commit"]) == 40
    assert repro.data.metrics["minutes.cv"] > 0 and exp_members.data.metrics["minutes.bagging"] > 0
    assert "minutes.cv" not in exp_members.data.metrics  # that experiment reran the members, not the cv stages
    assert "dvc_experiment" not in repro.data.tags and exp_lr.data.tags["dvc_experiment"] != exp_members.data.tags["dvc_experiment"]


def parent_runs(uri: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("transfer-learning")
    return client.search_runs([exp.experiment_id], "tags.role = 'parent'")


def differing(a, b) -> set[str]:
    return {k for k in a.data.params.keys() | b.data.params.keys() if a.data.params.get(k) != b.data.params.get(k)}


def test_plots_and_metrics_render(repo):
    dest, env, _ = repo
    sh("dvc plots show -o plots_html", dest, env)
    html = (dest / "plots_html" / "index.html").read_text()
    assert "learning curves, head" in html and "ROC, selected model" in html
    assert "accuracy" in sh("dvc metrics show", dest, env)


def test_local_remote_push_and_pull(repo):
    dest, env, tmp = repo
    remote = tmp / "remote"
    sh(f"dvc remote add -f -d local {remote} && dvc push", dest, env)
    before = (dest / "data/cache/train_x.npy").read_bytes()
    sh("rm -rf data/cache .dvc/cache && dvc pull", dest, env)
    assert (dest / "data/cache/train_x.npy").read_bytes() == before
    assert ran(sh("dvc repro", dest, env)) == {"sources"}


def test_adding_or_removing_an_image_reruns_split(repo):
    dest, env, tmp = repo
    assert ran(sh("dvc repro split", dest, env)) == {"sources"}
    extra = make_folder(tmp / "more", per_class=1, seed=5) / "dogs" / "dogs_000.png"
    added = tmp / "images" / "dogs" / "dogs_new.png"
    added.write_bytes(extra.read_bytes())
    assert ran(sh("dvc repro split", dest, env)) == {"sources", "split"}
    assert "dogs/dogs_new.png" in (dest / "data/split.csv").read_text()  # relative to the data folder
    added.unlink()
    assert ran(sh("dvc repro split", dest, env)) == {"sources", "split"}
    assert "dogs/dogs_new.png" not in (dest / "data/split.csv").read_text()
