"""Where relative paths are looked for (replicas and the CLI may run from anywhere)."""

from __future__ import annotations

from pathlib import Path

#: The repository root when Keel runs from a checkout (``pip install -e .``).
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def search_paths(path: str | Path, *roots: Path) -> list[Path]:
    """Where to look for ``path``: itself if absolute, else under the working directory,
    then under each of ``roots``, then under the project root."""
    chosen = Path(path).expanduser()
    if chosen.is_absolute():
        return [chosen]
    return [Path.cwd() / chosen, *(root / chosen for root in roots), PROJECT_ROOT / chosen]
