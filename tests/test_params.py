"""params.yaml is validated at load, with messages that name the file and the key."""
import pytest

from pipeline import params


def test_project_params_load():
    p = params.load()
    assert p.data.source == "elpv" and p.split.ratios == (0.65, 0.10, 0.25)
    assert p.section("validate") is p.validate_


@pytest.mark.parametrize("raw, key, words", [
    ({"split": {"ratios": [0.7, 0.2, 0.2]}}, "split.ratios", "sum to 1"),
    ({"split": {"counts": [2000, -1, 1000]}}, "split.counts", ">= 0"),
    ({"data": {"source": "s3"}}, "data.source", "'elpv', 'folder', 'kaggle' or 'csv'"),
    ({"data": {"source": "folder"}}, "data", "data.path is required"),
    ({"head": {"dropuot": 0.5}}, "head.dropuot", "unknown key"),
    ({"split": {"folds": 1}}, "split.folds", "at least 2"),
    ({"split": {"folds": 3}, "cv": {"folds": [0, 4]}}, "cv.folds", "folds 0..2"),
    ({"split": {"folds": 0}}, "cv.folds", "at least 2"),
    ({"head": {"designs": ["map", "map"]}}, "head.designs", "twice"),
    ({"validate": {"on_undecodable": "ignore"}}, "validate.on_undecodable", "'skip' or 'fail'"),
])
def test_bad_params_name_the_key(raw, key, words):
    with pytest.raises(params.ParamsError) as e:
        params.parse(raw, "my-params.yaml")
    msg = str(e.value)
    assert "my-params.yaml" in msg and words in msg
    assert key.split(".")[0] in msg


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(params.ParamsError, match="not found"):
        params.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: [1, 2\n")
    with pytest.raises(params.ParamsError, match="not valid YAML"):
        params.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(params.ParamsError, match="mapping"):
        params.load(bad)


def test_evaluating_finetune_needs_its_stage():
    from pipeline.params import Params

    with pytest.raises(ValueError, match=r"set finetune.start_from: \[head\]"):
        Params.model_validate({"evaluate": {"models": ["head", "finetune"]}})
    p = Params.model_validate({"finetune": {"start_from": ["head"]}, "evaluate": {"models": ["head", "finetune"]}})
    assert p.finetune.start_from == ["head"] and Params().evaluate.models == ["head", "bagging"]
