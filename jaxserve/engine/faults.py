"""Fault injection for tests: make the device step raise or hang, or one request's output
processing raise, without touching the engine's code paths when no fault is asked for.

Set from the environment (read once, when an AsyncLLM starts) or installed directly by a
test on an engine it owns:

    JAXSERVE_FAULTS="step_raise_after=5"            the 6th device step raises (dispatch):
                                                    an untraceable failure, the engine dies
    JAXSERVE_FAULTS="step_hang_after=3,step_hang_s=2"  the 4th step sleeps 2 s (once) before
                                                    its results are collected
    JAXSERVE_FAULTS="request_marker=@@FAIL@@"       output processing of every request whose
                                                    prompt text contains the marker raises:
                                                    a traced failure, only that request ends
    JAXSERVE_FAULTS="step_delay_s=0.01"              every step's results are collected 10 ms late:
                                                    a slow device, for tests whose subject is a
                                                    request outliving its client's deadline
    JAXSERVE_FAULTS="nan_logits_after=3"            from the 4th step on, the sampler sees NaN
                                                    hidden states (so NaN logits): the engine
                                                    must keep serving (tokens are garbage)

    with faults.installed(engine, Faults(request_marker="X")):  # a test; restored after
        ...

Hooks are instance attributes wrapped around `runner.dispatch`, `runner.collect`,
`runner._sample` (the jitted sampler program: its hidden-state input is poisoned) and
`OutputProcessor._output` of each (replica) engine, so an engine without faults runs exactly
its own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

ENV = "JAXSERVE_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by an injected fault."""


@dataclasses.dataclass(frozen=True)
class Faults:
    step_raise_after: int | None = None  # steps dispatched fine before one raises
    step_hang_after: int | None = None  # steps collected fine before one sleeps step_hang_s
    step_hang_s: float = 0.0
    step_delay_s: float = 0.0  # every collect sleeps this long first (a slow device)
    request_marker: str | None = None  # a prompt containing this fails in output processing
    nan_logits_after: int | None = None  # sampler calls fine before the hidden states turn NaN

    @property
    def active(self) -> bool:
        return (self.step_raise_after is not None or self.step_hang_after is not None
                or self.step_delay_s > 0 or self.request_marker is not None or self.nan_logits_after is not None)

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        """`key=value,key=value` with the field names; ValueError on anything else."""
        kwargs: dict[str, Any] = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in types:
                raise ValueError(f"{ENV}: unknown fault {item!r}; known: {', '.join(types)}")
            kind = types[key]
            kwargs[key] = value if "str" in kind else float(value) if "float" in kind else int(value)
        return cls(**kwargs)

    @classmethod
    def from_env(cls) -> "Faults":
        return cls.parse(os.environ.get(ENV, ""))


def install_from_env(engine) -> Callable[[], None] | None:
    """Installs JAXSERVE_FAULTS on the engine if it is set; returns the uninstaller (None: unset)."""
    if not os.environ.get(ENV):
        return None
    faults = Faults.from_env()
    log.warning("fault injection active (%s=%s)", ENV, os.environ[ENV])
    return install(engine, faults)


@contextlib.contextmanager
def installed(engine, faults: Faults) -> Iterator[None]:
    uninstall = install(engine, faults)
    try:
        yield
    finally:
        uninstall()


def install(engine, faults: Faults) -> Callable[[], None]:
    """Wraps the hooks on every replica of `engine` (an LLMEngine or a DataParallelEngine);
    returns a function that removes them."""
    if not faults.active:
        return lambda: None
    undo: list[Callable[[], None]] = []
    for replica in getattr(engine, "replicas", [engine]):
        undo += _install_one(replica, faults)

    def uninstall() -> None:
        for u in reversed(undo):
            u()
    return uninstall


def _wrap(obj, name: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    had = name in vars(obj)
    original = getattr(obj, name)
    setattr(obj, name, make(original))

    def undo() -> None:
        if had:
            setattr(obj, name, original)
        else:
            delattr(obj, name)
    return undo


def _install_one(engine, faults: Faults) -> list[Callable[[], None]]:
    undo = []
    if faults.step_raise_after is not None:
        dispatched = [0]

        def make_dispatch(dispatch):
            def faulty_dispatch(*args, **kwargs):
                if dispatched[0] >= faults.step_raise_after:
                    raise InjectedFault(f"injected device step failure (after {dispatched[0]} steps)")
                dispatched[0] += 1
                return dispatch(*args, **kwargs)
            return faulty_dispatch
        undo.append(_wrap(engine.runner, "dispatch", make_dispatch))
    if faults.step_hang_after is not None or faults.step_delay_s > 0:
        collected = [0]

        def make_collect(collect):
            def hanging_collect(*args, **kwargs):
                if faults.step_delay_s > 0:
                    time.sleep(faults.step_delay_s)
                if collected[0] == faults.step_hang_after:
                    log.warning("injected step hang: %.1f s", faults.step_hang_s)
                    time.sleep(faults.step_hang_s)
                collected[0] += 1
                return collect(*args, **kwargs)
            return hanging_collect
        undo.append(_wrap(engine.runner, "collect", make_collect))
    if faults.nan_logits_after is not None:
        sampled = [0]

        def make_sample(sample):
            def nan_sample(params, state, hidden, inputs):
                if sampled[0] >= faults.nan_logits_after:
                    hidden = hidden * float("nan")
                sampled[0] += 1
                return sample(params, state, hidden, inputs)
            return nan_sample
        undo.append(_wrap(engine.runner, "_sample", make_sample))
    if faults.request_marker is not None:
        marker, outputs = faults.request_marker, engine.outputs

        def prompt_text(group) -> str:  # front ends may send token ids: match their text too
            return group.prompt if group.prompt is not None else engine.tokenizer.decode(group.prompt_token_ids)

        def make_output(output):
            def faulty_output(req, finish):
                group = outputs.groups.get(req.parent_id)
                if group is not None and marker in prompt_text(group):
                    raise InjectedFault(f"injected output-processing failure for request {req.parent_id!r}")
                return output(req, finish)
            return faulty_output
        undo.append(_wrap(outputs, "_output", make_output))
    return undo
