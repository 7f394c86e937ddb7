"""Compiled inference with the weights frozen into the graph: inductor's ``freezing``, set around the calls of one
compiled function only, and a frozen compile whose copies of the weights go when it is released (and whose compiles
parse each of inductor's kernel templates once: :func:`templates_parsed_once`).

Freezing folds what a graph reads as parameters (and tensors marked as static addresses) into the compiled code as
constants: CPU linear layers then run on MKL's packed weights, PT2E's quantize/dequantize patterns lower to oneDNN
int8 kernels. Set process-wide, it froze the buffers of every model compiled later in the process — a static KV
cache's write position among them — so the callers here set it for their own calls. (Passed as
``torch.compile(..., options={"freezing": True})`` instead, torch 2.14's lowering of PT2E graphs fails:
"onednn.qlinear_prepack is not an OpOverload".) A frozen graph keeps the weights it was compiled with: its caller
compiles again when they change (:func:`mmformer.generation.search.frozen_next_logits`) or owns weights that never do
(:class:`mmformer.compress.pt2e_model.PT2EModel`), and releases the old compile (:meth:`FrozenCompile.release`).

Where the frozen weights live (torch 2.14): as attributes of the Python module inductor generates for the graph,
which it keeps for the life of the process (``PyCodeCache.modules`` and ``sys.modules``), and on dynamo's traced
graph module. Neither is dropped with the compiled function, so a model compiled again after its weights changed,
or deleted, left its frozen weights behind (~110 MB per recompile at whisper-tiny size). :class:`FrozenCompile`
records what its compiles made and releases it (measured: whisper-tiny dimensions, four weight changes each
followed by a compiled decoding, resident memory +454 MB before, +21 to +43 MB after: compiled code, not weights).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch


class _WithoutSettings(RuntimeError):
    """A graph of a :class:`FrozenCompile` traced by a call made without its settings (:meth:`FrozenCompile.again`)."""


def graph_limit(graphs: int | None) -> contextlib.AbstractContextManager:
    """Dynamo's limit of compiled graphs per function (``recompile_limit``, default 8; past it, dynamo runs the
    function uncompiled) for the calls inside — a thread-local patch; nothing is set for None (an empty patch would
    cost as much as a set one: ~20-60 µs a call)."""
    if graphs is None:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=graphs)


class FrozenCompile:
    """``torch.compile(fn)`` through inductor with its ``freezing`` (set for these calls only: a compile that happens
    in one of them freezes), releasable.

    A function ``fn`` runs as a copy with a code object and globals of its own: dynamo keeps compiled graphs per code
    object (so this compile never shares graphs with another model's) and stores each compiled graph as a global of
    the function it compiled. A module (PT2E's graph modules) is compiled as it is. :meth:`release` drops the frozen
    weights of every graph compiled so far (the generated modules' constants and dynamo's traced graphs' parameters):
    call it when the weights changed or their owner went, and do not call this object afterwards.

    Args:
        fn: the function or module to compile.
        dynamic: ``torch.compile``'s.
        guard_filter_fn: ``torch.compile``'s option of that name (which guards dynamo keeps).
        inductor: more inductor settings, set with ``freezing`` around these calls only (e.g. its C++ GEMM
            templates for PT2E's static int8 graphs: :data:`mmformer.compress.pt2e_model.STATIC_GEMMS`).
        graphs: dynamo's limit of compiled graphs for this function (its ``recompile_limit``, set around these calls;
            None: dynamo's setting).
        specialize_ones: dynamo's rule that a dimension of size 1 is the constant 1 (its graph serves no other size).
            False traces sizes of 1 as symbols like any other (``torch.fx``'s ``backed_size_oblivious``, and no
            "duck sizing", which would make equal sizes one symbol): a graph whose first call has a dimension of 1
            serves the later sizes too — a decoding step's past of one position (a one-token prompt) and one row.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        dynamic: bool = False,
        guard_filter_fn: Callable | None = None,
        inductor: dict[str, Any] | None = None,
        graphs: int | None = None,
        specialize_ones: bool = True,
    ):
        self._settings = {"freezing": True, **(inductor or {})}
        self._graph_limit = graphs
        self._specialize_ones = specialize_ones
        self._globals: dict[str, Any] = {}
        if isinstance(fn, types.FunctionType):
            code = fn.__code__.replace()
            self._globals = dict(fn.__globals__)
            fn = types.FunctionType(code, self._globals, code.co_name, fn.__defaults__)
        options = {"guard_filter_fn": guard_filter_fn} if guard_filter_fn is not None else None
        self._compiled = torch.compile(fn, dynamic=dynamic, backend=self._inductor, options=options)
        self._modules: list[types.ModuleType] = []  # the generated modules holding frozen constants
        self._graphs: list[torch.fx.GraphModule] = []

    def _inductor(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        """Inductor (``compile_fx``, what ``backend="inductor"`` runs), noting the modules the compile generated:
        dynamo compiles one graph at a time (its compile lock), so the modules appended meanwhile are this graph's.
        A graph traced without this object's settings (a call through :meth:`again` that needed one) is refused:
        :meth:`again` makes that call again with them."""
        import torch._inductor.config as inductor
        from torch._inductor.codecache import PyCodeCache
        from torch._inductor.compile_fx import compile_fx

        if any(getattr(inductor, key) != value for key, value in self._settings.items()):
            raise _WithoutSettings(f"a graph traced without {self._settings}")

        start = len(PyCodeCache.modules)
        with templates_parsed_once():
            compiled = compile_fx(gm, example_inputs)
        self._modules += PyCodeCache.modules[start:]
        self._graphs.append(gm)
        return compiled

    def __call__(self, *inputs: Any) -> Any:
        import torch._inductor.config as inductor

        with inductor.patch(self._settings), graph_limit(self._graph_limit), self._shapes():
            return self._compiled(*inputs)

    def _shapes(self) -> contextlib.AbstractContextManager:
        """How the calls inside trace sizes of 1 (read when a graph is traced; :meth:`again` traces none with it: its
        trace of a new graph is refused and made again through ``__call__``)."""
        if self._specialize_ones:
            return contextlib.nullcontext()
        from torch.fx.experimental import _config as shapes

        return shapes.patch(backed_size_oblivious=True, use_duck_shape=False)

    def again(self, *inputs: Any) -> Any:
        """Call with the signature of a call already made — the same shapes, dtypes, devices, grad mode and objects
        (a decoding's later steps): nothing is set around the call (inductor's settings and dynamo's graph limit, two
        thread-local patches: ~45 µs a call, 2.6-3.3 % of a frozen whisper-tiny decoding step; a PT2E int8 step at
        batch 1 7 %; BENCHMARKS.md), since nothing needs compiling. Dynamo still checks its guards, so inputs that do
        need a graph still get one: its trace, made without the settings, is refused by this object's backend and
        the call made again through ``__call__`` — the graph is compiled as every other one (past dynamo's own graph
        limit, 8, such inputs run uncompiled). (Skipping the guards too, ``set_stance(skip_guard_eval_unsafe=True)``,
        saved ~1 % more but sets a process-wide flag: another thread's compiled call meanwhile could run a graph made
        for other inputs.)"""
        try:
            return self._compiled(*inputs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            if not isinstance(error.inner_exception, _WithoutSettings):
                raise
        return self(*inputs)

    def release_with(self, owner: object) -> weakref.finalize:
        """Release when ``owner`` is garbage-collected (not at interpreter exit, where nothing needs freeing); calling
        the returned finalizer releases now, once."""
        finalizer = weakref.finalize(owner, self.release)
        finalizer.atexit = False
        return finalizer

    def release(self) -> None:
        """Drop every frozen weight this compile holds (idempotent)."""
        from torch._inductor.codecache import PyCodeCache

        for gm in self._graphs:  # its attributes: the model's parameters and buffers, as traced
            for name, _ in list(gm.named_parameters(recurse=False)):
                gm.register_parameter(name, None)
            for name, _ in list(gm.named_buffers(recurse=False)):
                gm.register_buffer(name, None)
        for module in self._modules:
            for name in [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]:
                delattr(module, name)  # the frozen constants (packed weights, the weights they came from)
            if sys.modules.get(module.__name__) is module:
                del sys.modules[module.__name__]
        mine = {id(m) for m in self._modules}
        PyCodeCache.modules[:] = [m for m in PyCodeCache.modules if id(m) not in mine]
        self._graphs, self._modules = [], []
        self._globals.clear()  # the compiled graphs' entry points


@functools.cache
def _parsed_template(parse: Callable[[str], Any], source: str) -> Any:
    return parse(source)


@contextlib.contextmanager
def templates_parsed_once() -> Iterator[None]:
    """While inside, inductor's kernel templates parse each Jinja source once.

    torch 2.14 renders every C++ GEMM template (PT2E static int8's linear layers,
    :data:`mmformer.compress.pt2e_model.STATIC_GEMMS`) from its Jinja source through
    ``KernelTemplate._template_from_string``, which makes a new Jinja environment and compiles the source again at
    every call — several times per product.
    Measured: the first whisper-tiny static int8 decoding (its four graphs compiled) 38.9 s → 28.1 s on the Xeon, the
    same ids. A Jinja template is a pure function of its source here (the environment and its one filter are the same
    at every call), so the parsed template is kept for the process (a few dozen small sources). Only compiles made by
    :class:`FrozenCompile` run inside; the original method is back afterwards. A torch without that method compiles as
    it is."""
    from torch._inductor.codegen import common

    original = vars(common.KernelTemplate).get("_template_from_string")
    if not isinstance(original, staticmethod):
        yield
        return
    common.KernelTemplate._template_from_string = staticmethod(functools.partial(_parsed_template, original.__func__))
    try:
        yield
    finally:
        common.KernelTemplate._template_from_string = original
