"""Measurements kept between runs, per machine, in the user's cache directory:
$XDG_CACHE_HOME/selfattn (default ~/.cache/selfattn), one JSON file per kind, with its date."""

import datetime
import json
import os
import platform
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "selfattn"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What identifies this machine's limits: CPU model, cores, memory."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1]) // (1024 * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu_name()} | {os.cpu_count()} cpus | {total} GiB | {platform.node()}"


def load(kind: str) -> dict | None:
    """The stored record of this kind for this machine, or None."""
    path = cache_dir() / f"{kind}.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if doc.get("machine") == machine_key() else None


def save(kind: str, record: dict) -> Path:
    path = cache_dir() / f"{kind}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(record, machine=machine_key(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path
