"""Reading the YAML configuration files (identity rules, matching model)."""

from __future__ import annotations

from pathlib import Path

import yaml

from schemas.errors import ConfigError


def load_document(path: str | Path | None, default_path: Path, what: str) -> object | None:
    """The parsed YAML of ``path``, or of ``default_path`` when ``path`` is empty.

    Returns None when no path is given and the default file is absent (the caller
    then uses its built-in document). Raises ConfigError naming the file for a
    missing file or invalid YAML."""
    if path is None or path == "":
        if not default_path.exists():
            return None
        path = default_path
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} file {path} is not valid YAML: {exc}") from None
