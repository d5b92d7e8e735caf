"""The diagnosis of training curves, on the curves people ask about (oscillating, stuck, overfitting) and on the
pipeline's own healthy head."""
import numpy as np
import pandas as pd

from conftest import ROOT
from pipeline import diagnose


def history(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"epoch": np.arange(1, n + 1), **{k: np.asarray(v, float) for k, v in columns.items()}})


def oscillating() -> pd.DataFrame:
    """val_acc as reported; train accuracy rising 0.6161 -> 0.9342; val_loss as reported for the first five epochs,
    then alternating with the accuracy."""
    val_acc = [0.9548, 0.6604, 0.9558, 0.8385, 0.9745, 0.8060, 0.9695, 0.7660, 0.9850, 0.8033, 0.9834, 0.7792]
    val_loss = [0.2298, 0.8340, 0.0983, 0.5063, 0.0541, 0.6010, 0.0702, 0.7400, 0.0459, 0.6120, 0.0488, 0.7010]
    acc = np.linspace(0.6161, 0.9342, 12)
    return history(accuracy=acc, loss=np.linspace(0.65, 0.18, 12), val_accuracy=val_acc, val_loss=val_loss)


def stuck() -> pd.DataFrame:
    """10 epochs of SGD at 1e-4: accuracy 0.5989 (val 0.5990) and loss 6.43 unchanged."""
    return history(accuracy=[0.5989] * 10, loss=[6.43] * 10, val_accuracy=[0.5990] * 10, val_loss=[6.43] * 10)


def overfitting() -> pd.DataFrame:
    """30 epochs: val_loss 0.6724, 0.6565, 0.6116, 0.5774 over the first four, ending 0.9987, 1.0139 with val acc
    0.7100, 0.7240; train acc reaching 0.9915, 0.9895 and train loss 0.0375, 0.0387 (the epochs between are
    interpolated)."""
    val_loss = [0.6724, 0.6565, 0.6116, 0.5774, *np.linspace(0.60, 0.98, 24), 0.9987, 1.0139]
    val_acc = [*np.linspace(0.62, 0.74, 28), 0.7100, 0.7240]
    acc = [*np.linspace(0.60, 0.99, 28), 0.9915, 0.9895]
    loss = [*np.linspace(0.66, 0.04, 28), 0.0375, 0.0387]
    return history(accuracy=acc, loss=loss, val_accuracy=val_acc, val_loss=val_loss)


def kinds(found) -> list[str]:
    return [f.kind for f in found]


def test_oscillation_is_recognised():
    found = diagnose.diagnose(oscillating())
    assert kinds(found) == ["oscillation"]
    assert "alternated up and down 10 times in 12 epochs" in found[0].seen and found[0].causes and found[0].remedy


def test_stuck_at_the_majority_class_is_recognised():
    assert kinds(diagnose.diagnose(stuck(), majority=0.599)) == ["stuck"]
    assert kinds(diagnose.diagnose(stuck())) == ["stuck"]  # flat accuracy and loss alone say it too
    assert diagnose.diagnose(stuck(), majority=0.80) == []  # flat, but not at the majority rate: not this finding


def test_overfitting_is_recognised_with_the_best_epoch():
    found = diagnose.diagnose(overfitting())
    assert kinds(found) == ["overfitting"]
    assert "lowest at epoch 4 (0.5774)" in found[0].seen and "epoch 4" in found[0].remedy


def test_the_pipelines_own_head_on_elpv_is_healthy():
    """The head's history from the default ELPV run (a copy: plots/ changes with every run and data set)."""
    healthy = pd.read_csv(ROOT / "tests" / "data" / "elpv_head_history.csv")
    assert len(healthy) == 30
    assert diagnose.diagnose(healthy, majority=1172 / 1706) == []  # functional cells' share of the training split
    assert diagnose.tags([]) == {"diagnosis": "healthy"}


def test_tags_and_cli(tmp_path, capsys):
    found = diagnose.diagnose(overfitting())
    tags = diagnose.tags(found)
    assert tags["diagnosis"] == "overfitting" and tags["diagnosis.overfitting"].startswith("overfitting: validation")
    overfitting().to_csv(tmp_path / "history.csv", index=False)
    assert diagnose.main([str(tmp_path / "history.csv")]) == 0
    assert "overfitting: validation loss was lowest at epoch 4" in capsys.readouterr().out
