"""The one typed schema of `params.yaml`, validated when it is loaded.

Every stage calls `load()` and reads its own section. A wrong key or value stops the run with a message that
names the file, the key and what is allowed, before any work is done.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = Path("params.yaml")


def merge(base: dict, over: dict) -> dict:
    """`base` params (a plain dict, as in params.yaml) with `over`'s keys replacing theirs, section by section."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Data(Section):
    source: Literal["elpv", "folder", "kaggle", "csv"] = "elpv"
    path: Optional[str] = None
    root: Optional[str] = None  # the folder every file must be inside (tables name files relative to it)
    elpv_threshold: float = Field(0.5, gt=0, le=1)
    elpv_labels: Literal["binary", "levels"] = "binary"  # levels: the four defect probabilities, one class each
    existing_split: Literal["honour", "pool"] = "pool"
    limit_per_class: Optional[int] = Field(None, gt=0)
    exclude: Optional[str] = None  # a reviewed CSV with a `path` column (as data/label_issues.csv): files left out

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source != "elpv" and not self.path:
            raise ValueError(f"data.path is required for source '{self.source}'")
        return self


class Split(Section):
    ratios: tuple[float, float, float] = (0.65, 0.10, 0.25)
    counts: Optional[tuple[int, int, int]] = None
    folds: int = Field(5, ge=0)
    stratify: list[str] = []
    near_copy_bits: Optional[int] = Field(16, ge=0, le=128)  # pHash bits (of 256) within which images are near-copies

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v):
        if any(r < 0 for r in v) or abs(sum(v) - 1) > 1e-6:
            raise ValueError(f"train/val/test ratios must be >= 0 and sum to 1, got {list(v)} (sum {sum(v):.4g})")
        if v[0] == 0:
            raise ValueError("the train ratio must be > 0")
        return v

    @field_validator("counts")
    @classmethod
    def _counts(cls, v):
        if v is not None and (any(c < 0 for c in v) or v[0] == 0):
            raise ValueError(f"train/val/test counts must be >= 0 with train > 0, got {list(v)}")
        return v

    @field_validator("folds")
    @classmethod
    def _folds(cls, v):
        if v == 1:
            raise ValueError("folds must be 0 (none) or at least 2")
        return v


class Validate(Section):
    on_undecodable: Literal["skip", "fail"] = "skip"
    min_side: int = Field(32, ge=1)
    share_gap: float = Field(0.05, ge=0, le=1)  # a class's share of a split vs of all splits, beyond two images' worth
    duplicates: Literal["report", "fail"] = "report"


class Cache(Section):
    image_size: int = Field(300, ge=8, le=1024)
    workers: int = Field(0, ge=0)


def known_backbone(name: str) -> str:
    from pipeline import backbones  # the one list of backbones (light: no Keras until a backbone is built)

    if name not in backbones.names():
        raise ValueError(f"'{name}' is unknown; choose one of {backbones.names()}")
    return name


class Backbone(Section):
    name: str = "efficientnet_lite1"
    weights: str = "default"
    cut_layer: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        return known_backbone(v)


class Extract(Section):
    batch_size: int = Field(32, ge=1)
    dtype: Literal["float16", "float32"] = "float16"


# Head designs, simplest first (the order the one-standard-error rule prefers, `pipeline.selection`): the pooled top
# (a vector), or a convolutional head on the feature map trained on and averaged over no flips, left-right flips
# (h), or left-right and upside-down flips (hv)
Design = Literal["pooled", "map", "map_h", "map_hv"]
DESIGNS = get_args(Design)


class Head(Section):
    designs: list[Design] = Field(["pooled", "map_h", "map_hv"], min_length=1)  # the candidates CV compares
    conv_filters: int = Field(64, ge=0)
    conv_layers: int = Field(2, ge=1, le=4)
    hidden: int = Field(0, ge=0)
    dropout: float = Field(0.5, ge=0, lt=1)
    learning_rate: float = Field(1e-3, gt=0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    patience: int = Field(8, ge=1)
    class_weight: Literal["balanced", "none"] = "balanced"

    @field_validator("designs")
    @classmethod
    def _once(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"{v} names a design twice")
        return v


class Augment(Section):
    rotation: float = Field(20, ge=0, le=180)
    width_shift: float = Field(0.1, ge=0, lt=1)
    height_shift: float = Field(0.1, ge=0, lt=1)
    shear: float = Field(0.1, ge=0, lt=1.5)
    zoom: float = Field(0.1, ge=0, lt=1)
    horizontal_flip: Optional[bool] = True
    vertical_flip: Optional[bool] = False   # fine-tuning: null = as the chosen design


class Finetune(Section):
    start_from: list[Literal["head"]] = []  # [head]: a `finetune@head` stage fine-tunes the head's model; [] = none
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    unfreeze_from: Optional[str] = None
    mixed_precision: bool = False
    steps_per_epoch: Optional[int] = Field(None, ge=1)
    augment_in: Literal["auto", "loader", "model"] = "auto"
    augment: Augment = Augment()


class Bagging(Section):
    members: list[int] = Field([1, 2], min_length=0)  # seeds of the members CV may add to the head, in order
    backbones: list[str] = []  # member i trains on the features of backbones[i % len]; [] = backbone.name only
    sample_fraction: float = Field(1.0, gt=0, le=1)

    @field_validator("backbones")
    @classmethod
    def _known(cls, v):
        for name in v:
            known_backbone(name)
        if len(set(v)) != len(v):
            raise ValueError(f"{v} names a backbone twice: each one's members are already its seeds")
        return v

    @field_validator("members")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"{v} names a member twice")
        return v


class NearCopies(Section):
    cosine: float = Field(0.995, gt=0, le=1)  # pooled features at least this similar are near-copies


class LabelIssues(Section):
    method: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"] = \
        "prune_by_noise_rate"  # cleanlab's filter_by
    show: int = Field(24, ge=0)  # in the report's gallery


class LearningCurve(Section):
    fractions: list[float] = Field([0.1, 0.25, 0.5], min_length=1)  # of each fold's training rows (1.0: the CV itself)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v):
        if any(not 0 < f < 1 for f in v) or sorted(set(v)) != list(v):
            raise ValueError(f"fractions must rise strictly, each between 0 and 1 (1.0 is the CV itself), got {list(v)}")
        return v


class Cv(Section):
    folds: list[int] = Field([0, 1, 2, 3, 4], min_length=2)  # which of split.folds cross-validation uses


class Export(Section):
    calibration_images: int = Field(100, ge=1)  # training images (seeded draw) that calibrate the int8 ranges
    threads: int = Field(1, ge=1)  # TFLite threads while scoring (1: the same figures on any machine)


class Gate(Section):
    # Figures that mean the same for any number of classes and any class shares (pipeline.selection):
    # balanced accuracy rescaled: chance 0, perfect 1 (below chance is negative: -1 lets every model through)
    min_adjusted_balanced_accuracy: float = Field(0.4, ge=-1, le=1)
    min_roc_auc: float = Field(0.85, ge=0, le=1)  # macro one-vs-rest for more than two classes


class Evaluate(Section):
    models: list[Literal["head", "finetune", "bagging"]] = ["head", "bagging"]
    slice_by: list[str] = ["type"]  # columns of data/split.csv to report every metric per value of (when present)
    gate: Gate = Gate()


class Tracking(Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "transfer-learning"
    register_as: str = "image-classifier"


class Score(Section):
    inbox: str = "data/inbox"  # the folder the score_new_images DAG scores (a trigger may name another)
    cron: Optional[str] = "0 6 * * *"  # null: only when triggered
    low_confidence: float = Field(0.6, gt=0, le=1)  # a top-class probability below this is a low-confidence prediction
    drift_threshold: float = Field(0.5, gt=0)  # pipeline.drift's figure above which the DAG's check_drift task fails
    drift_min_images: int = Field(20, ge=1)  # smaller batches: the figure is logged, not judged (it is mostly noise)


class Schedule(Section):
    cron: Optional[str] = "0 3 * * 1"  # null: runs only when triggered
    gpu_slots: int = Field(1, ge=1)
    gpu_queue: str = "default"
    retries: int = Field(2, ge=0)
    retry_delay_seconds: int = Field(60, ge=0)
    max_active_runs: int = Field(1, ge=1)


class Params(Section):
    seed: int = 42
    data: Data = Data()
    split: Split = Split()
    validate_: Validate = Field(Validate(), alias="validate")
    cache: Cache = Cache()
    backbone: Backbone = Backbone()
    extract: Extract = Extract()
    head: Head = Head()
    finetune: Finetune = Finetune()
    bagging: Bagging = Bagging()
    cv: Cv = Cv()
    near_copies: NearCopies = NearCopies()
    label_issues: LabelIssues = LabelIssues()
    learning_curve: LearningCurve = LearningCurve()
    evaluate: Evaluate = Evaluate()
    export: Export = Export()
    tracking: Tracking = Tracking()
    score: Score = Score()
    schedule: Schedule = Schedule()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _folds_exist(self):
        bad = [f for f in self.cv.folds if not 0 <= f < self.split.folds]
        if bad or len(set(self.cv.folds)) != len(self.cv.folds):
            raise ValueError(f"cv.folds {list(self.cv.folds)} must be distinct folds of split.folds ({self.split.folds}: "
                             f"folds 0..{self.split.folds - 1}); cross-validation makes every choice, so split.folds "
                             f"must be at least 2")
        if "finetune" in self.evaluate.models and not self.finetune.start_from:
            raise ValueError("evaluate.models lists finetune but no stage fine-tunes: set finetune.start_from: [head] "
                             "(or take finetune out of evaluate.models)")
        return self

    def section(self, name: str):
        return getattr(self, "validate_" if name == "validate" else name)


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key."""


def parse(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]).replace("validate_", "validate")
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (a typo?)"
            lines.append(f"  {key}: {msg}")
        raise ParamsError(f"{source} is invalid:\n" + "\n".join(lines) + f"\nFix these keys in {source}.") from None


def load(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run from the project root, or pass the params file's path")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return parse(raw, str(path))
