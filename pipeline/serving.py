"""The MLflow pyfunc of an image-in model: images in, probability and label out, with the recorded threshold.

`predict` takes
- an array batch: (N, H, W, 3) or one (H, W, 3) image, uint8 or float RGB 0..255 (resized to the model's size
  when it differs), or
- a DataFrame (what the REST server hands over) with a column `image` (base64-encoded image file bytes, or raw
  bytes) or `path` (image files),
and returns a DataFrame with `probability` (P(class 1) for two classes, else the top class's), `label` and every
class's probability (`prob_<class>`), as `python -m pipeline.predict` does. The optional param `threshold` overrides the recorded one.

Served over REST (`make serve`), the model reads only what a request carries: a `path` column is refused unless the
server was started with an allowed folder (`make serve SERVE_ROOT=/data/in`, i.e. `PIPELINE_SERVE_ROOT`), and then
only paths inside it, symlinks resolved; in-process (`mlflow.pyfunc.load_model(...).predict`) paths are read as
given. A bad request is answered 400 with a message that names the row and what is wrong with it (not an image,
too large, wrong shape), never a stack trace or a server path. Limits on a REST server: `MAX_ROWS` images a
request and `MAX_PIXELS` per decoded image (checked before decoding); everywhere: `MAX_BYTES` per encoded image.

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
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

MAX_ROWS = 256                # images in one request
MAX_BYTES = 20 * 1024 * 1024  # one encoded image file
MAX_PIXELS = 50_000_000       # one decoded image (width x height), checked before decoding
SERVE_ROOT_ENV = "PIPELINE_SERVE_ROOT"  # the folder a REST server may read `path`s in (`make serve SERVE_ROOT=...`)


class BadInput(ValueError):
    """What is wrong with a request, in words a client can act on (no server paths, no stack trace)."""


def serving() -> bool:
    """Is this process MLflow's REST scoring server (which sets this variable), rather than an in-process caller?"""
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"


def decode(item, size: int, row: int = 0) -> np.ndarray:
    """One image (base64 text or raw bytes of an image file) as (size, size, 3) uint8, preprocessed as training."""
    from pipeline.images import load_rgb

    if isinstance(item, str):
        if len(item) > MAX_BYTES * 4 // 3 + 4:
            raise BadInput(f"row {row}: column 'image' holds more than {MAX_BYTES:,} bytes")
        try:
            item = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise BadInput(f"row {row}: column 'image' must hold base64-encoded image bytes") from None
    if not isinstance(item, (bytes, bytearray)) or not item:
        raise BadInput(f"row {row}: column 'image' is empty or not bytes")
    if len(item) > MAX_BYTES:
        raise BadInput(f"row {row}: column 'image' holds more than {MAX_BYTES:,} bytes")
    try:
        return load_rgb(bytes_io.BytesIO(bytes(item)), size, max_pixels=MAX_PIXELS if serving() else None)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the request's, said without internals
        raise BadInput(f"row {row}: column 'image' is not a readable image ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image file format this server reads"
    if isinstance(e, Image.DecompressionBombError):
        return f"more than the limit of {MAX_PIXELS:,} pixels"
    if isinstance(e, ValueError) and "pixels" in str(e):
        return str(e)
    return "truncated or corrupt image data"


def allowed_file(value, row: int) -> str:
    """A `path` cell as a file this process may read: any path in-process; on a REST server only one inside its
    allowed folder (symlinks resolved), and none without one. The refusal never says whether the file exists."""
    if not serving():
        return str(value)
    root = os.environ.get(SERVE_ROOT_ENV)
    if not root:
        raise BadInput(f"row {row}: column 'path' is refused: this server reads no files. Send the image itself "
                       "(column 'image', base64), or start the server with `make serve SERVE_ROOT=<folder>`")
    base = Path(root).resolve()
    target = (base / str(value)).resolve()
    if not target.is_relative_to(base):
        raise BadInput(f"row {row}: path '{value}' is outside the folder this server may read (name files relative "
                       "to it)")
    if not target.is_file():
        raise BadInput(f"row {row}: path '{value}' names no file in the folder this server may read")
    return str(target)


def as_images(model_input, size: int) -> np.ndarray:
    """The model input (array, DataFrame of `image` or `path`, dict of arrays) as a uint8/float (N, size, size, 3)."""
    from PIL import Image

    from pipeline.images import load_rgb

    if isinstance(model_input, dict) and len(model_input) == 1:
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.DataFrame):
        if serving() and len(model_input) > MAX_ROWS:
            raise BadInput(f"{len(model_input)} rows: send at most {MAX_ROWS} images a request")
        if len(model_input) == 0:
            raise BadInput("no rows: send at least one image")
        if "image" in model_input:
            return np.stack([decode(v, size, row) for row, v in enumerate(model_input["image"])])
        if "path" in model_input:
            out = []
            for row, p in enumerate(model_input["path"]):
                file = allowed_file(p, row)
                try:
                    out.append(load_rgb(file, size, max_pixels=MAX_PIXELS if serving() else None))
                except Exception as e:  # noqa: BLE001
                    if not serving():
                        raise
                    raise BadInput(f"row {row}: path '{p}' is not a readable image ({_reason(e)})") from None
            return np.stack(out)
        raise BadInput(f"expected a column 'image' (base64 image bytes) or 'path', got {list(model_input.columns)}")
    x = np.asarray(model_input)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[-1] != 3 or not np.issubdtype(x.dtype, np.number):
        raise BadInput(f"expected RGB images shaped (N, H, W, 3) or (H, W, 3), got an array of shape {x.shape}")
    if serving() and (len(x) > MAX_ROWS or x[0].size * len(x) > MAX_PIXELS * 3):
        raise BadInput(f"{len(x)} images of {x.shape[1]}x{x.shape[2]}: send at most {MAX_ROWS} images and "
                       f"{MAX_PIXELS:,} pixels a request")
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
        try:
            return self.classify(model_input, (params or {}).get("threshold"))
        except BadInput as e:  # MLflow answers an MlflowException with its message and status, without a trace
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None

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
        outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "label"),
                        *(ColSpec("double", f"prob_{c}") for c in meta["classes"])]),
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
