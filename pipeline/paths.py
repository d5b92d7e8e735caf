"""Where each stage reads and writes. dvc.yaml declares the same paths (tests/test_dvc.py checks they agree)."""
from pathlib import Path

DATA = Path("data")
SOURCE_INDEX = DATA / "source_index.csv"
HASH_MEMO = Path(".dvc/tmp/source_hashes.json")  # this machine's (size, mtime) -> sha256 of the source's files: never an output
SPLIT_TABLE = DATA / "split.csv"
SPLIT_SUMMARY = DATA / "split_summary.json"
VALIDATE_DIR = DATA / "validate"
VALIDATE_REPORT = VALIDATE_DIR / "report.json"
VALIDATE_SUMMARY = VALIDATE_DIR / "summary.md"
CACHE_DIR = DATA / "cache"
FEATURES_DIR = DATA / "features"
FEATURES_BY_BACKBONE = DATA / "features_by_backbone"  # bagging.backbones other than backbone.name
PREDICTIONS_DIR = DATA / "predictions"
CV_DIR = DATA / "cv"  # designs/<d>/ and bagging/member_<i>/ fold_<k>.npz (cv, bagging stages); recipe, oof.csv (choose)
RECIPE = CV_DIR / "recipe.json"
OOF_TABLE = CV_DIR / "oof.csv"
NEAR_COPIES = DATA / "near_copies.csv"  # near_copies stage: every image in a near-copy group, leaks marked
LABEL_ISSUES = DATA / "label_issues.csv"  # label_issues stage: suspected label errors, worst first
MODELS = Path("models")
EXPORTS = Path("exports")  # export stage: the delivered model as TFLite files
SCORED = DATA / "scored"  # the score_new_images DAG: predictions.csv and skipped.csv, every batch appended
METRICS = Path("metrics")
PLOTS = Path("plots")
DATA_PLOTS = PLOTS / "data"  # the pictures of the data checks (near-copies, label issues, learning curve)
SPLITS = ("train", "val", "test")
