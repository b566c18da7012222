"""Training steps captured as CUDA graphs: ``lthfast imp`` on CUDA, unless ``--no-cuda-graph``.

An eager step of a small network on a fast GPU is bound by host time: the H200 spent 1.26 ms per step of
Linear(4096, 4096) against 0.43-0.66 ms of kernels (benchmarks/results/h200-notes.md), and LeNet-300-100's
kernels are shorter still. A CUDA graph replays the whole step (forward, loss, backward, optimizer step, the mask
guard, the running loss and accuracy sums) as one launch.

A unit captures its own graph, so every prune (a new unit) is followed by a new capture. The first
``WARMUP_STEPS`` iterations of a unit (and of a resumed unit) run eagerly, on a side stream as torch's whole-network
recipe does: they make the optimizer's state, tune the kernels' configs and build the masks' tile indexes, none of
which may happen inside a capture. The next iteration captures the step on static input buffers and replays it;
every later one copies its batch into those buffers and replays. Warm-up steps and replays run the same kernels, so
a run is the same experiment either way (up to cuBLAS picking another algorithm inside a capture).

What the graph needs from the optimizer: a learning rate it reads from device memory (a 0-d tensor, refilled
before every replay, so schedules work), torch's fused SGD or capturable Adam / AdamW (their step counts live on
the device). ``graph_ready`` sets that up after any resume; ``eager_state_dict`` writes checkpoints as an eager run
would, so a run may be resumed with or without graphs. The mask guard's zeroing (``mask_optimizer``) is captured
with the step and replays every time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lthfast.distributed import World

# Eager iterations of a unit before its capture (torch's recipe warms up for 3; lthfast's kernels tune on their
# first call and torch's optimizers make their state on theirs).
WARMUP_STEPS = 3

Step = Callable[[torch.Tensor, torch.Tensor], None]


def blocker(cfg, device: torch.device, world: World) -> str | None:
    """Why a unit of this run cannot train with graphed steps (None: it can): the one-line reason printed when
    ``cuda_graph`` is on and the device is CUDA but something in the run is not capturable."""
    if world.active:
        return "DDP (torchrun) all-reduces gradients from hooks outside any graph"
    if cfg.amp == "fp16":
        return "fp16's GradScaler reads the inf check on the host at every step"
    if cfg.compile:
        return "--compile traces the step itself (use torch.compile's mode='reduce-overhead' for graphs there)"
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    return None


def graph_ready(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make ``optimizer`` (torch's SGD, Adam or AdamW, as ``make_optimizer`` builds them) capturable on ``device``:
    each group's learning rate a 0-d float32 tensor there, SGD fused and Adam / AdamW capturable on CUDA, and Adam's
    step counts moved to the device. Called after any resume (a checkpoint holds the eager form)."""
    cuda = device.type == "cuda"
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        if isinstance(optimizer, torch.optim.SGD):
            group["fused"] = cuda or None
        elif "capturable" in group:
            group["capturable"] = cuda
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor) and cuda:
                    optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
    if isinstance(optimizer, torch.optim.SGD) and cuda:
        optimizer._step_supports_amp_scaling = True  # what torch's SGD sets when built with fused=True


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate to ``lr``: refilled in place where it is a tensor (a graph reads it there)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def eager_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as an eager run writes it: learning rates as floats, SGD not fused, Adam / AdamW
    not capturable with their step counts on the CPU. A graph-ready optimizer's state is otherwise the same."""
    sd = optimizer.state_dict()
    if not any(isinstance(group["lr"], torch.Tensor) for group in sd["param_groups"]):
        return sd  # not graph-ready: written as it is
    groups = []
    for group in sd["param_groups"]:
        group = dict(group)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
        if isinstance(optimizer, torch.optim.SGD):
            group["fused"] = None
        elif group.get("capturable"):
            group["capturable"] = False
            for i in group["params"]:
                state = sd["state"].get(i, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].detach().to("cpu", torch.float32)
        groups.append(group)
    return {"state": sd["state"], "param_groups": groups}


def _cuda_capture(step: Step, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(x, y)
    return graph.replay


class GraphedStep:
    """``step(x, y)``, run eagerly for ``warmup`` calls, then captured once on static copies of (x, y) and replayed.

    ``step`` is the whole training step on a batch; ``zero_grad`` drops the gradients before the capture, so that
    the captured backward makes them in the graph's memory (torch's recipe). ``capture(step, x, y)`` returns the
    replay function (tests stand in for CUDA there). ``replays`` and ``eager`` count the calls of each kind.
    """

    def __init__(self, step: Step, zero_grad: Callable[[], None], warmup: int = WARMUP_STEPS, capture=None) -> None:
        self.step, self.zero_grad, self.warmup = step, zero_grad, warmup
        self.capture = capture if capture is not None else _cuda_capture
        self.replay: Callable[[], None] | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eager = 0
        self.replays = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.replay is None and self.eager < self.warmup:
            self._side_stream(lambda: self.step(x, y))
            self.eager += 1
            return
        if self.replay is None:
            self.static = (x.clone(), y.clone())
            self.zero_grad()
            self.replay = self.capture(self.step, *self.static)
        else:
            self.static[0].copy_(x)
            self.static[1].copy_(y)
        self.replay()
        self.replays += 1

    @staticmethod
    def _side_stream(run: Callable[[], None]) -> None:
        """``run()`` on a side stream ordered after and before the current one (eager warm-up before a capture)."""
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            run()
            return
        side, current = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            run()
        current.wait_stream(side)
