"""What `jaxserve presets` prints: one line per preset of jaxserve.presets (machine, mesh, dtype, buckets).

    list_presets()   -> [Preset(name, machine, mesh, dtype, token_buckets, seq_buckets), ...]
    format_presets() -> the table

Kept apart from jaxserve.presets because it reads the files with jaxserve.config.read_yaml,
and jaxserve.config resolves preset names through jaxserve.presets.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from jaxserve.config import read_yaml
from jaxserve.presets import preset_names, presets_dir

MACHINE_CHARS = 90


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
