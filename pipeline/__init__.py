"""The transfer-learning pipeline. Importing it pins the numerics (`device.pin_numerics`) before Keras loads."""
from pipeline import device as _device

_device.pin_numerics()
