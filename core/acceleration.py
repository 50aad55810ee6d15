"""Optional torch.compile of a UNet's forward while training, with a fallback to eager and the compile time measured."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)
COMPILE_BACKEND = "inductor"  # torch's default code generator (needs a C++ compiler on the CPU, Triton on CUDA)


class CompileTimer:
    """Seconds the first compiled call took (compilation included), so a run can report it apart from its steps."""

    def __init__(self) -> None:
        self.first_call_seconds: float | None = None
        self.fell_back = ""  # why compilation was given up ('' while compiled or never tried)


@contextmanager
def compiled_forward(module: torch.nn.Module, timer: CompileTimer) -> Iterator[None]:
    """While active, module.forward is torch.compile'd; a compile failure falls back to the eager forward, logged.

    Errors inside compilation fall back through dynamo's own suppress_errors; anything compile itself raises up
    front (no compiler, an unsupported platform) leaves the eager forward in place. The original forward (an instance
    attribute or the class's) is restored on exit.
    """
    had_own = "forward" in module.__dict__
    original = module.__dict__.get("forward")
    eager = module.forward
    try:
        compiled = torch.compile(eager, backend=COMPILE_BACKEND, dynamic=False)
    except Exception as error:  # noqa: BLE001 - any reason compile cannot start means: train eagerly
        timer.fell_back = f"torch.compile could not start ({type(error).__name__}: {error})"
        log.warning("compile: %s; training without it", timer.fell_back)
        yield
        return
    module.forward = _timed_first_call(compiled, eager, timer)
    dynamo_config = importlib.import_module("torch._dynamo").config
    suppress = dynamo_config.suppress_errors
    dynamo_config.suppress_errors = True  # a graph that fails to compile runs eagerly instead of failing
    try:
        yield
    finally:
        dynamo_config.suppress_errors = suppress
        if had_own:
            module.forward = original
        else:
            del module.forward


def _frame_counts() -> tuple[int, int]:
    """Frames dynamo has tried to convert so far, and graphs it compiled (a frame compiled earlier counts in neither).

    A frame whose graph fails in the backend under suppress_errors runs eagerly and adds no graph; a frame without
    tensor work converts "ok" with no graph either, so the graphs, not the ok frames, tell whether anything compiled.
    """
    counters = importlib.import_module("torch._dynamo.utils").counters
    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def _timed_first_call(compiled: Callable[..., Any], eager: Callable[..., Any], timer: CompileTimer) -> Callable[..., Any]:
    """The compiled forward, timing its first call; if that call raises, the eager forward from then on."""
    state = {"first": True, "use": compiled}

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not state["first"]:
            return state["use"](*args, **kwargs)
        state["first"] = False
        before = _frame_counts()
        start = time.perf_counter()
        try:
            out = compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - compiled code that cannot run: keep training, eagerly
            timer.fell_back = f"the compiled forward failed ({type(error).__name__}: {error})"
            log.warning("compile: %s; training without it", timer.fell_back)
            state["use"] = eager
            return eager(*args, **kwargs)
        timer.first_call_seconds = time.perf_counter() - start
        tried, graphs = (after - was for after, was in zip(_frame_counts(), before))
        if tried and not graphs:  # dynamo's suppress_errors ran every frame eagerly (its warnings say why)
            timer.fell_back = f"no graph compiled: dynamo ran the forward's {tried} frame(s) eagerly; see its warnings"
            log.warning("compile: %s; training without it", timer.fell_back)
            return out
        log.info("compile: first compiled forward took %.1f s (compilation included)", timer.first_call_seconds)
        return out

    return forward
