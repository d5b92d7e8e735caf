"""The report page, `reports/index.html`: one static, offline page (every image embedded) that the evaluate stage
writes and logs to MLflow. `make report` prints its path.

It shows, top to bottom: the data (counts per split and class, skipped files and why, near-copies and leaks,
suspected label errors, the learning curve over the amount of data), the diagnosis of every
training history (`pipeline.diagnose`), the metrics of every model with the selected one marked, the learning
curves and evaluation plots, an error gallery (the test images the selected model gets most confidently wrong,
per class, and the least certain correct ones) and where the model looks: Grad-CAM overlays (Selvaraju et al.,
2017) on a few test images of each class, errors included. Grad-CAM weighs each channel of the backbone's feature
map (the `features` part of the image-in model, `pipeline.models`) by the mean gradient of the predicted class's
logit (its score before the sigmoid or softmax), sums them, keeps the positive part and scales it to the image:
red is where the evidence for the decision lies. It needs the TensorFlow backend; on another backend the page says
so instead of showing overlays.
"""
from __future__ import annotations

import base64
import contextlib
import html
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import diagnose, figures, io, models, paths

REPORT = Path("reports") / "index.html"
GROUPS_SHOWN = 20


# ------------------------------------------------------------------------------------------------ choosing images

def margins(prob: np.ndarray, threshold: float) -> np.ndarray:
    """How sure each decision is: distance from the threshold (two classes) or the top probability (more)."""
    prob = np.asarray(prob)
    return np.abs(prob - threshold) if prob.ndim == 1 else prob.max(1)


def pick(y: np.ndarray, prob: np.ndarray, threshold: float, n_classes: int, per_class: int) -> dict:
    """Per true class, the row indices of the most confidently wrong and the least certain correct predictions."""
    pred, sure = models.labels(prob, threshold), margins(prob, threshold)
    out = {"wrong": {}, "unsure": {}}
    for c in range(n_classes):
        wrong = np.flatnonzero((y == c) & (pred != c))
        right = np.flatnonzero((y == c) & (pred == c))
        out["wrong"][c] = wrong[np.argsort(-sure[wrong], kind="stable")][:per_class]
        out["unsure"][c] = right[np.argsort(sure[right], kind="stable")][:per_class]
    return out


def overlay_rows(y: np.ndarray, prob: np.ndarray, threshold: float, n_classes: int, per_class: int = 2) -> np.ndarray:
    """A few test rows per class for the overlays: its most confident errors, then its most confident hits."""
    pred, sure = models.labels(prob, threshold), margins(prob, threshold)
    rows = []
    for c in range(n_classes):
        for mask in ((y == c) & (pred != c), (y == c) & (pred == c)):
            idx = np.flatnonzero(mask)
            rows += list(idx[np.argsort(-sure[idx], kind="stable")][:per_class])
    return np.array(rows, int)


# ------------------------------------------------------------------------------------------------ Grad-CAM

@contextlib.contextmanager
def logits(model):
    """Within the block, the model's sigmoid/softmax output layers return their logits: Grad-CAM takes the class
    score before the squashing, whose gradient vanishes where the model is sure."""
    import keras

    squashing = {keras.activations.sigmoid, keras.activations.softmax}
    swapped = [layer for layer in model._flatten_layers() if getattr(layer, "activation", None) in squashing]
    saved = [layer.activation for layer in swapped]
    try:
        for layer in swapped:
            layer.activation = keras.activations.linear
        yield model
    finally:
        for layer, activation in zip(swapped, saved):
            layer.activation = activation


def grad_cam(model, images: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(N, S, S) maps in [0, 1] for an image-in model (`pipeline.models`): where the evidence for each image's
    `predicted` class (its label at the model's threshold) is."""
    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"Grad-CAM here needs the TensorFlow backend, not {keras.backend.backend()}")
    # a cross-backbone ensemble has one (features, classifier) pair per backbone: the mean of their maps
    return np.mean([_grad_cam(f, c, images, predicted) for f, c in models.group_parts(model)], axis=0)


def _grad_cam(features, classifier, images: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    import keras
    import tensorflow as tf

    pool = None
    if len(features.output.shape) == 2:  # the pooled head design: look at the top map before its pooling
        pool = features.layers[-1]
        features = keras.Model(features.inputs, pool.input)
    x = tf.convert_to_tensor(np.asarray(images, np.float32))
    fmap = features(x, training=False)
    with logits(classifier), tf.GradientTape() as tape:
        tape.watch(fmap)
        z = classifier(fmap if pool is None else pool(fmap), training=False)
        if z.shape[-1] == 1:  # one logit: evidence for class 1, or against it for class 0
            score = z[:, 0] * tf.constant(np.where(predicted == 1, 1.0, -1.0), z.dtype)
        else:
            score = tf.gather(z, tf.constant(predicted), axis=1, batch_dims=1)
    grads = tape.gradient(score, fmap)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1))[..., None]
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy()
    top = cam.reshape(len(cam), -1).max(1).reshape(-1, 1, 1)
    return np.divide(cam, top, out=np.zeros_like(cam), where=top > 0)


# ------------------------------------------------------------------------------------------------ figures

def _caption(classes, true: int, pred: int, prob_row, threshold: float) -> str:
    p = float(prob_row) if np.ndim(prob_row) == 0 else float(np.max(prob_row))
    what = f"P({classes[1]})" if np.ndim(prob_row) == 0 else "p"
    return f"true {classes[true]}\npred {classes[pred]}, {what} {p:.2f}"


def gallery_figure(x, y, prob, threshold: float, classes, per_class: int = 6):
    """The error gallery as a figure: per true class, one row of confident errors and one of unsure hits."""
    plt = figures.pyplot()

    chosen = pick(y, prob, threshold, len(classes), per_class)
    rows = [(f"{classes[c]}: most confidently wrong", chosen["wrong"][c]) for c in range(len(classes))]
    rows += [(f"{classes[c]}: least certain correct", chosen["unsure"][c]) for c in range(len(classes))]
    pred = models.labels(prob, threshold)
    fig, axes = plt.subplots(len(rows), per_class, figsize=(1.9 * per_class, 2.35 * len(rows)), squeeze=False)
    for r, (title, idx) in enumerate(rows):
        for k, ax in enumerate(axes[r]):
            ax.set_axis_off()
            if k < len(idx):
                i = idx[k]
                ax.imshow(np.asarray(x[i]))
                ax.set_title(_caption(classes, y[i], pred[i], prob[i], threshold), fontsize=7,
                             color="firebrick" if y[i] != pred[i] else "black")
        axes[r][0].text(-0.05, 0.5, title, transform=axes[r][0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=8)
        if not len(idx):
            axes[r][0].text(0.5, 0.5, "none", transform=axes[r][0].transAxes, ha="center", va="center")
    fig.tight_layout()
    return fig


def overlay_figure(x, cams, y, pred, prob, threshold: float, classes):
    """Each image beside its Grad-CAM overlay."""
    plt = figures.pyplot()

    cols = 4
    n_rows = int(np.ceil(len(x) / (cols // 2)))
    fig, axes = plt.subplots(n_rows, cols, figsize=(2.3 * cols, 2.5 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for k in range(len(x)):
        a, b = axes.ravel()[2 * k], axes.ravel()[2 * k + 1]
        a.imshow(np.asarray(x[k]))
        a.set_title(_caption(classes, y[k], pred[k], prob[k], threshold), fontsize=7,
                    color="firebrick" if y[k] != pred[k] else "black")
        b.imshow(np.asarray(x[k]))
        b.imshow(cams[k], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        b.set_title("Grad-CAM", fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ the page

def _img(path: Path, alt: str) -> str:
    if not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(frame: pd.DataFrame, marked: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = ""
    for _, row in frame.iterrows():
        cls = ' class="selected"' if marked is not None and row.iloc[0] == marked else ""
        body += f"<tr{cls}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def metrics_frame(results: dict) -> pd.DataFrame:
    rows = []
    for name, r in results.items():
        cv = r["cv"] or {}
        rows.append({"model": name, "threshold": f"{r['threshold']:.3f}",
                     "CV balanced accuracy (mean ± SD over folds)":
                         f"{cv['balanced_accuracy_mean']:.4f} ± {cv['balanced_accuracy_sd']:.4f}" if cv else
                         "not cross-validated",
                     **{f"{s} {k}": f"{r[s][k]:.4f}" if r[s] else "-" for s in ("cv", "test")
                        for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss")}})
    return pd.DataFrame(rows)


def per_class_frame(result: dict) -> pd.DataFrame:
    """Precision, recall and F1 of each class of one model, out of fold (CV) and on test."""
    classes = list(result["test"].get("per_class", {}))
    splits = [s for s in ("cv", "test") if result[s]]
    return pd.DataFrame([{"class": c, **{f"{s} {k}": (f"{result[s]['per_class'][c][k]:.4f}" if k != "n" else
                                                     str(result[s]['per_class'][c][k]))
                                         for s in splits for k in ("precision", "recall", "f1", "n")}}
                         for c in classes])


def slices_frame(result: dict) -> pd.DataFrame:
    """One model's figures per slice (`evaluate.slice_by`): out of fold (CV) and on test."""
    rows = []
    for column, by in (result.get("slices") or {}).items():
        for value, r in by.items():
            rows.append({"slice": f"{column} = {value}",
                         **{f"{s} {k}": (f"{r[s][k]:.4f}" if k != "n" else str(r[s][k])) if r[s] else "-"
                            for s in ("cv", "test") for k in ("n", "accuracy", "balanced_accuracy", "macro_f1",
                                                               "roc_auc")}})
    return pd.DataFrame(rows)


def data_section() -> str:
    summary = io.read_json(paths.SPLIT_SUMMARY)
    counts = pd.DataFrame(summary["counts"]).reindex(columns=list(paths.SPLITS)).fillna(0).astype(int)
    counts.loc["all"] = counts.sum()
    counts = counts.reset_index(names="class")
    out = f"<p>{summary['n_images']} images from <code>{html.escape(str(summary.get('source')))}</code>, " \
          f"{summary.get('folds', 0)} folds over train+val.</p>" + _table(counts)
    if summary.get("excluded"):
        out += f"<p>{summary['excluded']} file(s) left out of every split: a reviewed list names them " \
               f"(<code>data.exclude</code>).</p>"
    if paths.VALIDATE_REPORT.exists():
        report = io.read_json(paths.VALIDATE_REPORT)
        skipped = report.get("skipped", [])
        out += f"<p>Validation: {'passed' if report.get('success') else 'FAILED'}; {len(skipped)} file(s) skipped.</p>"
        if skipped:
            why = pd.DataFrame({"file": skipped, "why": [report.get("reasons", {}).get(f, "") for f in skipped]})
            out += _table(why)
    return out + near_copies_part() + label_issues_part() + learning_curve_part()


def _metrics(name: str) -> dict | None:
    file = paths.METRICS / f"{name}.json"
    return io.read_json(file) if file.exists() else None


def near_copies_part() -> str:
    m = _metrics("near_copies")
    if m is None:
        return ""
    h, f = m["hash"], m["features"]
    out = (f"<h3>Near-copies and leaks</h3><p>By perceptual hash (flips and 90° turns, within {h['max_bits']} of 256 "
           f"bits): <b>{h['images']}</b> images in {h['groups']} groups, {h['mixed_classes']} of them holding more "
           f"than one class; the split keeps each group in one split and fold. By pooled features (cosine ≥ "
           f"{f['cosine']}): {f['images']} images in {f['groups']} groups ({f['also_by_hash']} also found by hash). "
           f"<b>{m['leaks']}</b> test image(s) have a near-copy in train or val (a leak).</p>")
    if m["leaks"]:
        out += _table(pd.DataFrame({"leaking test image": m["leak_files"]}))
    found = pd.read_csv(paths.NEAR_COPIES, keep_default_na=False) if paths.NEAR_COPIES.exists() else pd.DataFrame()
    if len(found):
        groups = (found.groupby(["kind", "group"], sort=False)
                  .agg(files=("path", ", ".join), splits=("split", lambda s: ", ".join(sorted(set(s)))),
                       classes=("class_name", lambda s: ", ".join(sorted(set(s)))), leak=("leak", "any"),
                       n_classes=("class_name", "nunique"), size=("path", "size"))
                  .reset_index()  # leaks first, then groups holding two classes, then the largest
                  .sort_values(["leak", "n_classes", "size"], ascending=False, kind="stable")
                  .drop(columns=["group", "n_classes", "size"]))
        shown = groups.head(GROUPS_SHOWN)
        out += _table(shown) + (f"<p>... and {len(groups) - len(shown)} more groups in "
                                f"<code>{paths.NEAR_COPIES}</code>.</p>" if len(groups) > len(shown) else "")
    return out + _img(paths.DATA_PLOTS / "near_copies.png", "near-copy groups, leaks first")


def label_issues_part() -> str:
    m = _metrics("label_issues")
    if m is None:
        return ""
    pairs = ", ".join(f"{html.escape(k)}: {v}" for k, v in m["given_to_suggested"].items()) or "none"
    return (f"<h3>Suspected label errors</h3><p>Confident learning (cleanlab, {html.escape(m['method'])}) on the "
            f"out-of-fold predictions of {html.escape(m['design'])}: <b>{m['issues']}</b> of {m['rows']} train+val "
            f"images ({100 * m['share']:.1f} %) look mislabelled ({pairs}). The list is "
            f"<code>{paths.LABEL_ISSUES}</code>; a reviewed copy named in <code>data.exclude</code> leaves them "
            f"out.</p>" + _img(paths.DATA_PLOTS / "label_issues.png", "suspected label errors, worst first"))


def learning_curve_part() -> str:
    m = _metrics("learning_curve")
    if m is None:
        return ""
    law = m["power_law"]
    points = pd.DataFrame([{"share of training rows": f"{q['fraction']:.0%}", "rows": f"{q['rows']:.0f}",
                            "CV accuracy": f"{q['accuracy_mean']:.4f} ± {q['accuracy_sd']:.4f}"} for q in m["points"]])
    return (f"<h3>Would more labels help?</h3><p>{html.escape(m['design'])} trained on part of each fold's training "
            f"rows, scored on the fold's held-out rows. A power law (error = a·n<sup>-b</sup>, b = {law['b']:.3f}) "
            f"says doubling the labels would gain about <b>{law['gain_2x_points']:.1f} points</b> "
            f"({100 * law['fitted_accuracy']:.1f} → {100 * law['accuracy_2x']:.1f} %).</p>" + _table(points)
            + _img(paths.DATA_PLOTS / "learning_curve.png", "learning curve over the amount of data"))


def diagnosis_section(found: dict[str, list]) -> str:
    items = ""
    for name, findings in found.items():
        if findings:
            items += "".join(f"<li><b>{html.escape(name)}</b> — <b>{f.kind}</b>: {html.escape(f.seen)}. "
                             f"<i>Usual causes:</i> {html.escape(f.causes)}. <i>Here:</i> {html.escape(f.remedy)}.</li>"
                             for f in findings)
        else:
            items += f"<li><b>{html.escape(name)}</b>: no finding (no oscillation, not stuck, no overfitting)</li>"
    return f"<ul>{items}</ul>"


STYLE = """body{font-family:sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
tr.selected{background:#fff3b0;font-weight:bold}figure{display:inline-block;margin:.5em}
img{max-width:100%;border:1px solid #ddd}figcaption{font-size:12px;color:#555}h2{border-bottom:1px solid #ddd}"""


def write_page(target: Path, *, title: str, results: dict, selected: str, selected_by: str,
               found: dict[str, list], pictures: list[tuple[Path, str]], notes: list[str] = ()) -> Path:
    """The static page: every figure embedded, no external resource."""
    sliced = slices_frame(results[selected])
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<h2>Data</h2>", data_section(),
             "<h2>Training curves: diagnosis</h2>", diagnosis_section(found),
             "<h2>Models</h2>",
             f"<p>Delivered: <b>{html.escape(selected)}</b>, by {html.escape(selected_by)}. CV figures are out-of-fold "
             f"over train+val; test figures are reported for every model and used for no choice.</p>",
             _table(metrics_frame(results), marked=selected),
             f"<p>Per class, {html.escape(selected)}:</p>", _table(per_class_frame(results[selected])),
             *((f"<p>Per slice, {html.escape(selected)}:</p>", _table(sliced)) if len(sliced) else ()),
             *(f"<p>{html.escape(n)}</p>" for n in notes),
             "<h2>Figures</h2>", *(_img(p, alt) for p, alt in pictures)]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    io.write_text(target, page)
    return target


def build(results: dict, selected: str, selected_by: str, trained: list[str], predictions: dict,
          out_dir: Path) -> Path:
    """Diagnose the histories of what params name (`trained`: `head`, `cv/map_h/fold_1`, `ensemble/member_1`, ...), draw
    the gallery and the overlays of the selected model (`predictions`: its prediction file) into `out_dir`, write
    the page."""
    classes = [str(c) for c in io.read_json(paths.CACHE_DIR / "meta.json")["classes"]]
    x, y = io.load_pair(paths.CACHE_DIR / "test")
    if not np.array_equal(predictions["test_y"], y):
        raise ValueError(f"data/predictions/{selected}.npz and data/cache/test_y.npy disagree: rerun `dvc repro`")
    prob, threshold = predictions["test_prob"], results[selected]["threshold"]
    majority = diagnose.majority_share(io.load_npy(paths.CACHE_DIR / "train_y.npy", mmap=False))
    found = {name: diagnose.diagnose(pd.read_csv(paths.PLOTS / name / "history.csv"), majority) for name in trained
             if (paths.PLOTS / name / "history.csv").exists()}
    pictures = [(figures.save(gallery_figure(x, y, prob, threshold, classes), out_dir / "gallery.png"),
                f"error gallery of the selected model ({selected}), test split")]
    notes = []
    rows = overlay_rows(y, prob, threshold, len(classes))
    try:
        labels = models.labels(prob, threshold)
        cams = grad_cam(models.load(selected)[0], np.asarray(x[rows]), labels[rows])
        pictures.append((figures.save(overlay_figure(np.asarray(x[rows]), cams, y[rows], labels[rows], prob[rows],
                                                   threshold, classes), out_dir / "gradcam.png"),
                        f"where {selected} looks: Grad-CAM on test images of each class, errors first"))
    except RuntimeError as e:
        notes.append(f"No Grad-CAM overlays: {e}.")
    curves = [(paths.PLOTS / name / "learning_curves.png", f"learning curves: {name}") for name in trained
              if "/" not in name]
    pictures = curves + [(paths.PLOTS / "cv" / "candidates.png", "head designs compared by cross-validation"),
                         (out_dir / "roc_calibration.png", "ROC and calibration, test split"),
                         (out_dir / "confusion.png", "confusion matrices, test split")] + pictures
    page = write_page(REPORT, title="transfer-pipeline report", results=results, selected=selected,
                      selected_by=selected_by, found=found, pictures=pictures, notes=notes)
    return page


def main(argv=None) -> int:
    """`make report`: print the page's path (it is written by the evaluate stage)."""
    if not REPORT.exists():
        print(f"{REPORT} not found: run `make run` (or `dvc repro evaluate`) first")
        return 1
    print(REPORT.resolve().as_uri())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
