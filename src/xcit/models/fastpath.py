"""Which implementation a layer runs: its readable reference maths, or a fast path, chosen by timing both here.

A fast path (oneDNN GEMMs with fused bias and GELU, channel-major cross-covariance
attention, a folded stem, class attention without keys or values) pays on some CPUs
and costs on others: oneDNN's float32 GEMM is twice MKL's rate on an AMD EPYC and
slower than it in the backward pass on an Intel Xeon. So nothing here is tuned by a
constant. Each module with a fast path has `impl`, shown by print(model):

- 'auto' (the default): on first use for a given operation, shape and mode, both
  candidates run a few times on the real operands (forward, and the backward pass
  where autograd records) and the faster one is kept for the rest of the process.
  The reference is always a candidate, so a layer is never slower than the plain maths.
- 'fast' or 'reference': that path, always (where the fast one cannot run, as on
  another device or dtype, the reference runs).

Compiled graphs take the reference maths of an 'auto' layer, unless the model was
compiled by `compile_static`: on each new kind of input that times every candidate
once more, each compiled on its own, and the graph takes the fastest of those
(inductor fuses around plain ops, and a path that wins in eager may lose there);
the whole graph is then timed against the model run eagerly, and runs only where it
is the faster.

`XCIT_FAST_PATH=auto|fast|reference` sets what new models get; `set_fast_path`
switches a built model. `fast_path_decisions()` lists what was chosen and why
(`xcit bench` prints it), and `XCIT_FAST_PATH_CACHE=<file.json>` keeps decisions
on disk, keyed by CPU model and torch version, so later processes skip the timing.
Timing draws nothing from the random generators and leaves no gradients behind.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

PATHS = ('auto', 'fast', 'reference')
ENV_PATH = 'XCIT_FAST_PATH'
ENV_CACHE = 'XCIT_FAST_PATH_CACHE'
IN_GRAPH = ' | compiled'  # the key suffix of a decision for compiled graphs
GRAPH = ' | graph'  # the key suffix of a whole compiled model's decision against the model run eagerly
# A candidate timed compiled on its own goes into graphs only when it beats the reference by more than this:
# alone it misses the fusions across module borders that favour plain ops in a whole graph, and paths within
# a few percent there swapped on reruns and cost a whole nano training graph 17 % (BENCHMARKS.md, family 23).
GRAPH_MARGIN = 0.05

# key -> the path compiled graphs take under 'auto' (read while a graph is traced)
_graph_paths: dict[str, str] = {}
# the backend of the graphs `time_paths_for_graphs` runs for, while it runs: `pick` also times each candidate
# compiled with it
_timing_for_graphs: str | Callable | None = None
# set while the runs to time are built for a graph decision: `candidate_step` compiles what it runs
_compile_candidates = False


def check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"fast path must be one of {', '.join(PATHS)}, not {path!r}")
    return path


def default_fast_path() -> str:
    """What new modules take: $XCIT_FAST_PATH if set ('auto', 'fast' or 'reference'), else 'auto'."""
    value = os.environ.get(ENV_PATH, 'auto')
    if value not in PATHS:
        raise ValueError(f"{ENV_PATH} must be one of {', '.join(PATHS)}, not {value!r}")
    return value


@dataclass(frozen=True)
class Decision:
    path: str  # the name of the candidate that won
    times_ms: dict[str, float]  # every candidate's best time

    @property
    def why(self) -> str:
        return 'timed here: ' + ', '.join(f'{name} {ms:.3g} ms' for name, ms in self.times_ms.items())


Run = Callable[[], object]
Timer = Callable[[Sequence[Run]], list[float]]


def best_of_alternating_ms(runs: Sequence[Run], rounds: int = 5) -> list[float]:
    """The fastest of `rounds` timed calls of each run, after a warm-up, taken in turns so that a slow
    spell of the machine hits them all alike (CUDA work is waited for)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = [float('inf')] * len(runs)
    for r in range(rounds + 1):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            sync()
            if r:  # round 0 warms up
                best[i] = min(best[i], time.perf_counter() - start)
    return [t * 1e3 for t in best]


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    info = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(':')
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers: virtual machines often report a
    bare 'AMD EPYC' or 'Intel(R) Xeon(R) Processor' for generations that time very differently."""
    info = _cpuinfo()
    name = info.get('model name') or platform.processor() or platform.machine()
    if 'cpu family' in info and 'model' in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def _machine() -> str:
    return f'{cpu_name()} | torch {torch.__version__}'


def _decisions_from(state) -> dict[str, Decision]:
    """Decisions from a state dict (a checkpoint's or the disk cache's): ValueError naming what is malformed."""
    try:
        out = {}
        for key, d in state.items():
            times = {str(name): float(ms) for name, ms in d['times_ms'].items()}
            if str(d['path']) not in times:
                raise ValueError(f"decision {d['path']!r} is not among its candidates")
            out[str(key)] = Decision(str(d['path']), times)
        return out
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f'malformed fast-path decisions ({type(e).__name__}: {e})') from None


class PathChooser:
    """Times the candidates of each (operation, shape, mode) key once and remembers the fastest."""

    def __init__(self, timer: Timer = best_of_alternating_ms):
        self.timer = timer
        self._decisions: dict[str, Decision] = {}
        self._disk_loaded = False

    def choose(self, key: str, runs: dict[str, Run], margin: float = 0.0) -> str:
        """The name of the fastest of `runs` (zero-argument callables) for `key`, timing them the first time;
        with a `margin` (a fraction), another run wins over 'reference' only when faster by more than that."""
        decision = self._decisions.get(key)
        if decision is None:
            self._load_disk()
            decision = self._decisions.get(key)
        if decision is None:
            with generators_kept():  # dropout in a candidate must not move a generator
                times = self.timer(list(runs.values()))
            times_ms = {name: round(t, 4) for name, t in zip(runs, times)}
            fastest = min(times_ms, key=times_ms.get)
            if 'reference' in times_ms and times_ms[fastest] > (1 - margin) * times_ms['reference']:
                fastest = 'reference'
            decision = Decision(fastest, times_ms)
            self._decisions[key] = decision
            self._save_disk()
        return decision.path

    def known(self, key: str) -> bool:
        if key not in self._decisions:
            self._load_disk()
        return key in self._decisions

    def decisions(self) -> dict[str, dict]:
        """Every decision of this process: key -> {path, times_ms, why}."""
        return {key: dict(asdict(d), why=d.why) for key, d in sorted(self._decisions.items())}

    def state_dict(self) -> dict[str, dict]:
        return {key: asdict(d) for key, d in self._decisions.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Take earlier decisions (a resumed run must run the paths it ran before to be bit-exact)."""
        self._decisions.update(_decisions_from(state))

    def _load_disk(self) -> None:
        path = os.environ.get(ENV_CACHE)
        if self._disk_loaded or not path:
            return
        self._disk_loaded = True
        try:
            with open(path) as f:
                stored = _decisions_from(json.load(f).get(_machine(), {}))
        except (OSError, ValueError, AttributeError):
            return  # a missing or unreadable cache only means timing again
        for key, decision in stored.items():
            self._decisions.setdefault(key, decision)

    def _save_disk(self) -> None:
        path = os.environ.get(ENV_CACHE)
        if not path:
            return
        try:
            with open(path) as f:
                everything = json.load(f)
            if not isinstance(everything, dict):
                everything = {}
        except (OSError, ValueError):
            everything = {}
        everything[_machine()] = self.state_dict()
        tmp = f'{path}.{os.getpid()}.tmp'
        try:
            with open(tmp, 'w') as f:
                json.dump(everything, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)


CHOOSER = PathChooser()


def fast_path_decisions() -> dict[str, dict]:
    """What every 'auto' layer of this process chose, and the timings it chose by."""
    return CHOOSER.decisions()


def compile_candidate(fn: Callable[..., torch.Tensor], backend: str | Callable) -> Callable[..., torch.Tensor]:
    """A candidate as a compiled graph runs it: one static graph of its own, by the graph's backend."""
    return torch.compile(fn, backend=backend, dynamic=False)


def candidate_step(fn: Callable[..., torch.Tensor], operands: Sequence[torch.Tensor | None], train: bool,
                   params: Sequence[torch.Tensor] = ()) -> Callable[[], object]:
    """A zero-argument run of `fn(*operands)` on detached copies of the operands: forward only, or with
    `train` forward and backward to the operands and `params` that need gradients (through
    autograd.grad, so that no .grad is touched)."""
    leaves = [None if t is None else t.detach().requires_grad_(train and t.requires_grad) for t in operands]
    if _compile_candidates:
        fn = compile_candidate(fn, _timing_for_graphs)
    if not train:
        return lambda: fn(*leaves)
    wrt = [t for t in (*leaves, *params) if t is not None and t.requires_grad]

    def run():
        out = fn(*leaves)
        return torch.autograd.grad(out, wrt, torch.ones_like(out))
    return run


Factories = dict[str, Callable[[], Run]]


def mode_tag(training: bool, grad: bool) -> str:
    """A module's mode for decision keys: train or eval, and whether autograd records."""
    return ('train' if grad else 'train-no-grad') if training else ('eval-grad' if grad else 'infer')


def has_auto_paths(model: nn.Module) -> bool:
    """Whether any module of `model` chooses its path by timing ('auto')."""
    return any(isinstance(m, FastPathModule) and m.impl == 'auto' for m in model.modules())


def dtype_tag(x: torch.Tensor) -> str:
    """The precision an op on `x` runs in, for decision keys: autocast's, where it is on, else x's dtype."""
    if x.device.type != 'meta' and torch.is_autocast_enabled(x.device.type):
        return f'autocast-{str(torch.get_autocast_dtype(x.device.type)).removeprefix("torch.")}'
    return str(x.dtype).removeprefix('torch.')


def pick(impl: str, key: str, candidates: Factories, compiled_alike: bool = False) -> str:
    """Which candidate a layer on `impl` runs for `key`: 'reference' (always a key of `candidates`), the
    first other one for 'fast', or for 'auto' the fastest, timed the first time `key` is seen (the
    factories build the runs to time only then). Compiled graphs take, under 'auto', the candidate that
    was fastest compiled (`time_paths_for_graphs`), or the reference where none was timed so; exported
    graphs the reference. `compiled_alike`: the candidates compile to the very calls they make eagerly
    (a lone GEMM each), so the eager decision stands for graphs too and nothing is compiled to time them."""
    if impl == 'reference':
        return 'reference'
    if impl == 'fast':
        return next(name for name in candidates if name != 'reference')
    if torch.compiler.is_compiling():  # an exported graph must run without this package's ops
        return 'reference' if torch.compiler.is_exporting() else _graph_paths.get(key, 'reference')
    path = CHOOSER.choose(key, {} if CHOOSER.known(key) else {name: factory() for name, factory in candidates.items()})
    if _timing_for_graphs is not None:
        _graph_paths[key] = path if compiled_alike else _choose_compiled(key, candidates)
    return path


def _choose_compiled(key: str, candidates: Factories) -> str:
    """The fastest of `candidates` with each run compiled on its own, timed the first time `key` is seen."""
    global _compile_candidates
    if CHOOSER.known(key + IN_GRAPH):
        return CHOOSER.choose(key + IN_GRAPH, {})
    _compile_candidates = True
    try:
        runs = {name: factory() for name, factory in candidates.items()}
    finally:
        _compile_candidates = False
    # one code object (the reference linear, say) is compiled for every shape it meets: past dynamo's limit
    # of recompilations it would silently run eagerly and be timed so
    with torch._dynamo.config.patch(recompile_limit=1 << 16, accumulated_recompile_limit=1 << 16):
        return CHOOSER.choose(key + IN_GRAPH, runs, margin=GRAPH_MARGIN)


def _timed_already(key: str) -> bool:
    return CHOOSER.known(key) and (_timing_for_graphs is None or CHOOSER.known(key + IN_GRAPH))


def generators_kept():
    """A scope whose random draws (CPU, and the current CUDA device where in use) leave the generators as they were."""
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=cuda)


@contextmanager
def buffers_put_back(module: nn.Module):
    """A scope after which `module`'s buffers (BatchNorm's statistics) hold what they held before it."""
    saved = {name: b.clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        # through .data: BatchNorm's own updates of its statistics leave their version counters alone, and a
        # tracked copy here would fail the backward of any earlier forward still waiting for it (DINO's
        # multi-crop runs a second size before the first one's backward)
        for name, b in module.named_buffers():
            b.data.copy_(saved[name])


class FastPathModule:
    """A module with fast paths beside its reference maths; `impl` ('auto', 'fast' or 'reference') says which runs."""

    impl: str

    def _init_fast_path(self, impl: str | None) -> None:
        self.impl = check_path(impl or default_fast_path())

    def extra_repr(self) -> str:
        own = super().extra_repr()
        return f'{own}, impl={self.impl}' if own else f'impl={self.impl}'

    def pick(self, key: str, candidates: Factories, x: torch.Tensor) -> str:
        """`pick` for this module's input `x`; buffers that timed runs change (BatchNorm's statistics) are put
        back. Nothing is timed on the meta device (FLOP counters run there): it takes the reference."""
        if self.impl == 'auto' and x.device.type == 'meta':
            return 'reference'
        if self.impl != 'auto' or torch.compiler.is_compiling() or _timed_already(key):
            return pick(self.impl, key, candidates)
        with buffers_put_back(self):
            return pick(self.impl, key, candidates)

    def fastest(self, key: str, forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
                train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The one of `forwards` (name -> a function of `x`, 'reference' among them) that `pick` chooses for
        `key`, each timed on `x`, with the backward pass to `x` and this module's parameters where `train`."""
        def timed(forward):  # built only when the key must be timed
            return lambda: candidate_step(forward, (x,), train, list(self.parameters()))
        return forwards[self.pick(key, {name: timed(f) for name, f in forwards.items()}, x)]


def time_paths_for_graphs(model: nn.Module, args: tuple, kwargs: dict, backend: str | Callable = 'inductor') -> None:
    """Run `model(*args, **kwargs)` once eagerly (in the caller's grad mode), with each 'auto' layer timing its
    candidates compiled by `backend`, each on its own, where it has not yet: a graph that backend compiles
    afterwards takes the fastest. The model's buffers and the random generators are left as they were; the
    output is dropped."""
    global _timing_for_graphs
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # a forward through DDP without its backward would upset its reducer
    if not has_auto_paths(model):
        return
    _timing_for_graphs = backend
    try:
        with buffers_put_back(model), generators_kept():
            model(*args, **kwargs)
    finally:
        _timing_for_graphs = None


def set_fast_path(model: nn.Module, path: str) -> nn.Module:
    """Put every module of `model` that has a fast path on `path` ('auto', 'fast' or 'reference'); returns it."""
    check_path(path)
    for module in model.modules():
        if isinstance(module, FastPathModule):
            module.impl = path
    return model


def get_fast_path(model: nn.Module) -> str | None:
    """The path the modules of `model` take (None if none of them has a fast path)."""
    paths = {module.impl for module in model.modules() if isinstance(module, FastPathModule)}
    if len(paths) > 1:
        raise ValueError(f'the modules take different paths ({", ".join(sorted(paths))}); see set_fast_path')
    return next(iter(paths), None)
