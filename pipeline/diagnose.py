"""What a training history says: oscillation, stuck at the majority class, overfitting, or nothing to report.

`diagnose(history)` is a pure function over a `history.csv` frame (columns `epoch`, `loss`, `accuracy`,
`val_loss`, `val_accuracy`, as Keras writes them): it returns `Finding`s, each naming what was seen (with the
epochs and figures), the usual causes in one line, and what this pipeline does about it. The stages that train
(head, finetune, bagging members, folds) print the findings, tag their MLflow run with them, and the report page
shows them; `python -m pipeline.diagnose plots/head/history.csv` diagnoses any saved history.

The rules, and the thresholds they use (a healthy head on ELPV moves its validation accuracy by at most about
0.07 from one epoch to the next; the seeds' oscillating run by 0.12 to 0.30):
- oscillation: at least `MIN_ALTERNATIONS` consecutive validation steps that alternate up and down, each at least
  `ACC_STEP` in accuracy, or a factor `LOSS_STEP` in loss;
- stuck: training accuracy within `FLAT` of one value (and of the majority-class share, when given) and the loss
  within 1 % of one value, over at least 3 epochs: nothing was learned;
- overfitting: on curves smoothed over `SMOOTH` epochs (so that an oscillation is not read as a trend), validation
  loss ends at least `LOSS_RISE` times its lowest while the training loss kept falling after the best epoch, and
  training accuracy ends at least `GAP` above validation accuracy.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

ACC_STEP, LOSS_STEP, MIN_ALTERNATIONS = 0.10, 1.5, 3
FLAT = 0.005
LOSS_RISE, GAP, SMOOTH = 1.25, 0.10, 4


@dataclass(frozen=True)
class Finding:
    kind: str  # oscillation | stuck | overfitting
    seen: str  # what the curves show, with epochs and figures
    causes: str  # the usual causes, one line
    remedy: str  # what this pipeline does about it, and what to change

    def line(self) -> str:
        return f"{self.kind}: {self.seen}. Usual causes: {self.causes}. Here: {self.remedy}."


def _alternations(values: np.ndarray, large) -> int:
    """How many consecutive pairs of large steps go in opposite directions."""
    steps = np.diff(values)
    big = np.array([large(a, b) for a, b in zip(values[:-1], values[1:])], bool)
    return int(sum(big[i] and big[i + 1] and steps[i] * steps[i + 1] < 0 for i in range(len(steps) - 1)))


def oscillation(h: pd.DataFrame) -> Finding | None:
    seen = []
    if "val_accuracy" in h:
        acc = h["val_accuracy"].to_numpy(float)
        n = _alternations(acc, lambda a, b: abs(b - a) >= ACC_STEP)
        if n >= MIN_ALTERNATIONS:
            swing = np.abs(np.diff(acc)).max()
            seen.append(f"validation accuracy alternated up and down {n} times in {len(acc)} epochs "
                        f"(swings up to {swing:.2f}, between {acc.min():.3f} and {acc.max():.3f})")
    if "val_loss" in h:
        loss = np.maximum(h["val_loss"].to_numpy(float), 1e-12)
        n = _alternations(loss, lambda a, b: max(a, b) / min(a, b) >= LOSS_STEP)
        if n >= MIN_ALTERNATIONS:
            seen.append(f"validation loss alternated {n} times by a factor of {LOSS_STEP} or more "
                        f"(between {loss.min():.3f} and {loss.max():.3f})")
    if not seen:
        return None
    return Finding("oscillation", "; ".join(seen),
                   "a learning rate too high for the batch size, BatchNorm statistics updated on small fine-tuning "
                   "batches, a small or unshuffled validation set, or augmentation left on at validation",
                   "batches are reshuffled every epoch, BatchNorm stays frozen while fine-tuning, the learning rate "
                   "halves on a plateau and the best-val_loss weights are kept; lower `learning_rate` or raise "
                   "`batch_size`")


def stuck(h: pd.DataFrame, majority: float | None = None) -> Finding | None:
    if len(h) < 3 or "accuracy" not in h or "loss" not in h:
        return None
    acc, loss = h["accuracy"].to_numpy(float), h["loss"].to_numpy(float)
    flat_acc = acc.max() - acc.min() <= FLAT
    flat_loss = loss.max() - loss.min() <= 0.01 * max(abs(loss.mean()), 1e-12)
    at_majority = majority is None or abs(acc.mean() - majority) <= 2 * FLAT + 0.01
    if not (flat_acc and flat_loss and at_majority):
        return None
    share = f", the share of the larger class ({majority:.3f})" if majority is not None else ""
    return Finding("stuck", f"training accuracy stayed at {acc.mean():.4f}{share} and the loss at {loss.mean():.4f} "
                            f"for all {len(h)} epochs: nothing was learned",
                   "a learning rate far too low (plain SGD at 1e-4) or too high, every layer frozen, or labels "
                   "detached from the inputs (a wrong label mapping, shuffled labels)",
                   "the head trains with Adam at `head.learning_rate` on a frozen base; check the labels in "
                   "data/split.csv and the validate report, then raise `learning_rate`")


def overfitting(h: pd.DataFrame) -> Finding | None:
    needed = {"loss", "val_loss", "accuracy", "val_accuracy"}
    if not needed <= set(h) or len(h) < 4:
        return None
    val_loss, loss = h["val_loss"].to_numpy(float), h["loss"].to_numpy(float)
    best = int(np.argmin(val_loss))  # the epoch the best-val_loss checkpoint came from
    trend = h[sorted(needed)].rolling(SMOOTH, min_periods=1).mean()  # an even window cancels an alternation
    rising = (trend["val_loss"].iloc[-1] >= LOSS_RISE * trend["val_loss"].min() and len(h) - 1 - best >= 3
              and trend["loss"].iloc[-1] < trend["loss"].iloc[best])
    gap = float(trend["accuracy"].iloc[-1] - trend["val_accuracy"].iloc[-1])
    if not (rising and gap >= GAP):
        return None
    epoch = int(h["epoch"].iloc[best]) if "epoch" in h else best + 1
    return Finding("overfitting",
                   f"validation loss was lowest at epoch {epoch} ({val_loss[best]:.4f}) and rose to {val_loss[-1]:.4f} "
                   f"while the training loss fell to {loss[-1]:.4f}; training accuracy ends "
                   f"{h['accuracy'].iloc[-1]:.4f} against {h['val_accuracy'].iloc[-1]:.4f} on validation",
                   "too little data for the model's capacity, too many epochs, too little dropout or augmentation",
                   f"the weights of epoch {epoch} (best val_loss) are the ones kept and training stops after "
                   "`patience` epochs without improvement; lower `epochs`, raise `dropout` or the augmentation, or "
                   "rely on the bagging ensemble")


def majority_share(y) -> float:
    """The larger class's share of the labels `y` (what a model that learned nothing scores)."""
    y = np.asarray(y)
    return float(np.bincount(y).max() / len(y))


def diagnose(history: pd.DataFrame, majority: float | None = None) -> list[Finding]:
    """Every finding for one training history (empty: nothing to report). `majority`: the larger class's share of
    the training labels, when known."""
    h = history.reset_index(drop=True)
    return [f for f in (oscillation(h), stuck(h, majority), overfitting(h)) if f is not None]


def tags(findings: list[Finding]) -> dict[str, str]:
    """MLflow run tags: `diagnosis` (the kinds, or `healthy`) and `diagnosis.<kind>` (the line)."""
    return {"diagnosis": ",".join(f.kind for f in findings) or "healthy",
            **{f"diagnosis.{f.kind}": f.line()[:5000] for f in findings}}


def as_dicts(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.diagnose", description=__doc__.split("\n\n")[0])
    ap.add_argument("history", nargs="+", help="history.csv files (plots/<stage>/history.csv)")
    ap.add_argument("--majority", type=float, help="the larger class's share of the training labels")
    args = ap.parse_args(argv)
    for file in args.history:
        found = diagnose(pd.read_csv(file), args.majority)
        print(f"{file}: " + ("no finding" if not found else "\n  ".join(["", *(f.line() for f in found)])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
