"""Engine presets by name: the YAML files of the repository's configs/ folder.

    resolve_preset("cpu")                  -> .../configs/cpu.yaml (installed or source checkout)
    resolve_preset("configs/cpu.yaml")     -> that file if it exists here, else the preset "cpu"
    resolve_preset("/my/own.yaml")         -> that file
    list_presets()                         -> [Preset(name, machine, mesh, dtype, buckets), ...]

configs/ is the one source: a wheel installs it as the package data `jaxserve/configs/*.yaml`
(pyproject's package-dir maps jaxserve.configs to configs/); a source checkout reads the folder
beside the jaxserve package. Nothing is copied.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
MACHINE_CHARS = 90


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


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    machine: str  # the file's leading comment up to its first colon (at most MACHINE_CHARS)
    mesh: str  # "data=D,model=M"
    dtype: str
    token_buckets: tuple[int, ...] | None
    seq_buckets: tuple[int, ...] | None

    def line(self) -> str:
        def buckets(b):
            return ",".join(map(str, b)) if b else "default"

        return (f"{self.name:<16} {self.mesh:<16} {self.dtype:<9} tokens {buckets(self.token_buckets):<38} "
                f"seqs {buckets(self.seq_buckets):<24} {self.machine}")


def describe_preset(path: Path) -> Preset:
    from jaxserve.config import read_yaml

    text = path.read_text()
    values = read_yaml(path)
    lines = text.splitlines()
    lead = [line.lstrip("# ").strip() for line in itertools.takewhile(lambda x: x.startswith("#"), lines)]
    machine = " ".join(lead).split(": ", 1)[0].rstrip(".")
    if len(machine) > MACHINE_CHARS:
        machine = machine[:MACHINE_CHARS - 3].rstrip() + "..."
    mesh = f"data={values.get('data_parallel_size', 1)},model={values.get('tensor_parallel_size', 1)}"
    tb, sb = values.get("token_buckets"), values.get("seq_buckets")
    return Preset(name=path.stem, machine=machine, mesh=mesh, dtype=str(values.get("dtype", "auto")),
                  token_buckets=tuple(tb) if tb else None, seq_buckets=tuple(sb) if sb else None)


def list_presets() -> list[Preset]:
    return [describe_preset(presets_dir() / f"{name}.yaml") for name in preset_names()]


def format_presets() -> str:
    header = f"{'name':<16} {'mesh':<16} {'dtype':<9} {'buckets (tokens per step, sequences per step)':<68} machine"
    return "\n".join([header] + [p.line() for p in list_presets()])
