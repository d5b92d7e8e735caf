"""The MLflow pyfunc of an image-in model: images in, probability and label out, with the recorded threshold.

`predict` takes
- an array batch: (N, H, W, 3) or one (H, W, 3) image, uint8 or float RGB 0..255 (resized to the model's size
  when it differs), or
- a DataFrame (what the REST server hands over) with a column `image` (base64-encoded image file bytes, or raw
  bytes) or `path` (image files readable by the server),
and returns a DataFrame with `probability` (P(class 1) for two classes, else the top class's) and `label`, as
`python -m pipeline.predict` does. The optional param `threshold` overrides the recorded one.

The model is logged as code (this file, with the `pipeline` package as its code path) plus two artifacts, the
`.keras` file and its JSON: loading it runs no pickle. MLflow's input schema is either named columns or one tensor,
and this model takes both forms, so its signature declares the outputs and the `threshold` param; the input
example is a one-row DataFrame of a base64 image, the form the REST server receives.

    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d "{\\"dataframe_split\\": {\\"columns\\": [\\"image\\"], \\"data\\": [[\\"$(base64 -w0 cell.png)\\"]]}}"
"""
from __future__ import annotations

import base64
import binascii
import io as bytes_io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd


def decode(item, size: int) -> np.ndarray:
    """One image (base64 text or raw bytes of an image file) as (size, size, 3) uint8, preprocessed as training."""
    from pipeline.images import load_rgb

    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("column 'image' must hold base64-encoded image bytes (use column 'path' for file "
                             "paths)") from None
    return load_rgb(bytes_io.BytesIO(bytes(item)), size)


def as_images(model_input, size: int) -> np.ndarray:
    """The model input (array, DataFrame of `image` or `path`, dict of arrays) as a uint8/float (N, size, size, 3)."""
    from PIL import Image

    from pipeline.images import load_rgb

    if isinstance(model_input, dict) and len(model_input) == 1:
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input:
            return np.stack([decode(v, size) for v in model_input["image"]])
        if "path" in model_input:
            return np.stack([load_rgb(str(p), size) for p in model_input["path"]])
        raise ValueError(f"expected a column 'image' (base64 image bytes) or 'path', got {list(model_input.columns)}")
    x = np.asarray(model_input)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected RGB images shaped (N, H, W, 3) or (H, W, 3), got an array of shape {x.shape}")
    if x.shape[1:3] != (size, size):
        x = np.stack([np.asarray(Image.fromarray(np.clip(i, 0, 255).astype(np.uint8)).resize((size, size),
                                                                                              Image.BILINEAR))
                      for i in x])
    return x


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc face of `models/<name>.keras` (see the module docstring)."""

    def load_context(self, context):
        self._load(context.artifacts["model"])

    def _load(self, model_file):
        from pipeline import models

        self.model, self.meta = models.load(str(model_file))
        return self

    def predict(self, context, model_input, params=None):
        return self.classify(model_input, (params or {}).get("threshold"))

    def classify(self, model_input, threshold: float | None = None) -> pd.DataFrame:
        """The prediction table for `model_input` (see the module docstring), at the recorded threshold or this one."""
        from pipeline import models

        threshold = models.threshold_of(self.meta) if threshold is None else float(threshold)
        prob = models.predict(self.model, as_images(model_input, self.meta["image_size"]))
        return models.table(prob, self.meta["classes"], threshold)


def local(model_file: str | Path) -> ImageClassifier:
    """The same pyfunc straight from a model file (no MLflow store), e.g. to score a candidate: `.classify(x)`."""
    return ImageClassifier()._load(model_file)


def log_model(mlflow_module, model_file: Path, registered_model_name: str | None = None):
    """Log `model_file` (and its JSON) as this pyfunc, with its signature and a base64 input example."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from pipeline import images, models

    meta = models.read_meta(str(model_file))
    signature = ModelSignature(
        outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "label")]),
        params=ParamSchema([ParamSpec("threshold", "double", models.threshold_of(meta))]))
    size = meta["image_size"]
    example = np.full((size, size, 3), 128, np.uint8)
    buffer = bytes_io.BytesIO()
    from PIL import Image

    Image.fromarray(example).save(buffer, format="PNG")
    input_example = pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]})
    package = Path(images.__file__).resolve().parent
    return mlflow_module.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).resolve()), code_paths=[str(package)],
        artifacts={"model": str(model_file), "meta": str(models.meta_path(str(model_file)))},
        signature=signature, input_example=input_example, registered_model_name=registered_model_name,
        pip_requirements=[f"mlflow=={mlflow.__version__}", "tensorflow-cpu", "keras", "pillow", "pandas", "numpy"])


mlflow.models.set_model(ImageClassifier())
