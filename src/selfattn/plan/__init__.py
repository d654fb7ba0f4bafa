"""Will it fit, how fast will it run: memory and speed predicted from a model's shape, a device's
limits and the efficiency an engine reaches on it."""

from .catalog import find_hardware, find_model, hardware_entries, model_entries
from .predict import Device, Prediction, device_for_this_machine, plan
from .shape import QUANT_BITS, ModelShape

__all__ = ["Device", "ModelShape", "Prediction", "QUANT_BITS", "device_for_this_machine",
           "find_hardware", "find_model", "hardware_entries", "model_entries", "plan"]
