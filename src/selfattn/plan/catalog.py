"""The catalogs shipped as data files beside this module, each figure with its source."""

import difflib
import json
from functools import cache
from importlib.resources import files


@cache
def load(name: str) -> dict:
    return json.loads(files(__package__).joinpath("data", name).read_text(encoding="utf-8"))


def hardware_entries() -> list[dict]:
    return load("hardware.json")["entries"]


def model_entries() -> list[dict]:
    return load("models.json")["entries"]


def efficiency(kind: str) -> dict:
    return load("efficiency.json")[kind]


def _find(name: str, entries: list[dict], what: str) -> dict:
    key = name.strip().lower()
    for e in entries:
        if e["name"] == key:
            return e
    names = [e["name"] for e in entries]
    close = difflib.get_close_matches(key, names, n=4, cutoff=0.3)
    close += [n for n in names if key and key in n and n not in close][:4 - len(close)]
    hint = f"closest: {', '.join(close)}" if close else f"known: {', '.join(names)}"
    raise ValueError(f"unknown {what} {name!r} ({hint})")


def find_hardware(name: str) -> dict:
    return _find(name, hardware_entries(), "hardware")


def find_model(name: str) -> dict:
    return _find(name, model_entries(), "model")
