"""Engine presets by name: the YAML files of the repository's configs/ folder.

    resolve_preset("cpu")                  -> .../configs/cpu.yaml (installed or source checkout)
    resolve_preset("configs/cpu.yaml")     -> that file if it exists here, else the preset "cpu"
    resolve_preset("/my/own.yaml")         -> that file

configs/ is the one source: a wheel installs it as the package data `jaxserve/configs/*.yaml`
(pyproject's package-dir maps jaxserve.configs to configs/); a source checkout reads the folder
beside the jaxserve package. Nothing is copied. jaxserve.preset_catalog describes them (`jaxserve presets`).
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def presets_dir() -> Path:
    """The folder of the presets: jaxserve/configs when installed, else the checkout's configs/."""
    installed = _PACKAGE / "configs"
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / "configs"


def preset_names() -> list[str]:
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_preset(config: str | os.PathLike) -> Path:
    """A preset's file from a name ("cpu", "tpu-v5e-8") or a path. A path that does not exist
    here but names a preset ("configs/cpu.yaml" from another directory) means that preset."""
    path = Path(config)
    if path.is_file():
        return path
    name = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    # A bare name, or the repository-relative spelling configs/NAME.yaml.
    if str(path.parent) in (".", "configs") and name in preset_names():
        return presets_dir() / f"{name}.yaml"
    raise ValueError(f"config {str(config)!r} is neither a file nor a preset name; "
                     f"the presets are: {', '.join(preset_names()) or '(none found)'}")
