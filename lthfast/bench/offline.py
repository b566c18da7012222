"""The masked kernels compiled for a CUDA GPU on a machine without one: what Triton makes of them.

Triton's compiler and ``ptxas`` ship with the triton wheel, so the kernels can be compiled for sm_90 anywhere.
Inside ``cuda_target()`` the launchers of ``lthfast.kernels`` take their CUDA decisions (weight-tile shape,
configs, dW splits) on CPU tensors, and every launch compiles each candidate config instead of running: the
kernels meet Triton's GPU compiler (which the interpreter in CI never runs), and each compiled variant reports
what decides its speed before any GPU is lent:

- ``wgmma``: Hopper's asynchronous tensor-core instruction (``mma`` is the Ampere-style synchronous one; neither
  means the dot runs on CUDA cores, as fp32 with IEEE products does);
- ``cp_async``: asynchronous global-to-shared copies, i.e. the loop's loads are software-pipelined;
- ``shared``: bytes of shared memory per program (one pipeline stage holds the A and B tiles of one step);
- ``registers`` and ``local`` (bytes per thread in local memory: spills), from ``cuobjdump``;
- ``programs_per_sm``: how many programs fit on one SM by registers and shared memory (occupancy);
- ``loop_instructions`` / ``loop_mma``: SASS instructions per warp in one step of the main loop, and how many of
  them are HGMMA / HMMA: a step issuing many times more than its matrix instructions is bound by issue, not by the
  tensor cores (an m64n32k16 HGMMA is ~16 cycles of one SM's tensor cores at bf16, m64n64k16 ~32);
- ``full_loop_instructions``: where a kernel has two such loops with the same matrix instructions (the full-tile
  loop, which reads no mask, and the partial-tile one), the shorter one's instructions per step; 0 otherwise.

The specialization is Triton's own (``JITFunction.warmup`` on the real arguments: 16-byte aligned pointers,
strides equal to 1), so the code is what a launch with the same tensors on a GPU would build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator

import torch

# sm_90 limits: 64K registers, 228 KB shared memory (1 KB of it reserved per program), 32 programs, 64 warps.
SM90 = {"registers": 65536, "shared": 233472, "reserved_shared": 1024, "programs": 32, "warps": 64}
H100_SMS = 132
_DEVICE_KEY = "lthfast-offline"  # the kernels' per-device cache entry for the offline target


@dataclasses.dataclass
class Compiled:
    """One compiled variant of a kernel launch (see the module docstring for the fields)."""

    kernel: str
    key: tuple
    config: dict
    shared: int
    registers: int
    local: int
    wgmma: int
    mma: int
    cp_async: int
    tma: int
    programs_per_sm: int
    loop_instructions: int
    loop_mma: int
    full_loop_instructions: int = 0

    def row(self) -> dict:
        return {"kernel": self.kernel, **self.config, **{f.name: getattr(self, f.name) for f in _STATS}}


_STATS = [f for f in dataclasses.fields(Compiled) if f.name not in ("kernel", "key", "config")]


class _Driver:
    """The part of Triton's driver that compiling (not launching) needs, for a GPU that is not here."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return _DEVICE_KEY

    def get_current_stream(self, device=None):
        return 0


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"lthfast.bench.offline: {path} is missing (a triton wheel without CUDA tools?)")
    return path


def available() -> bool:
    """True when Triton's NVIDIA backend and its tools are installed (no GPU needed), and Triton has the internals
    this module relies on (checked with triton 3.6 and 3.9): a driver slot to swap and ``JITFunction.warmup``."""
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        _tool("ptxas")
        _tool("cuobjdump")
    except (ImportError, FileNotFoundError):
        return False
    return hasattr(driver, "_active") and hasattr(JITFunction, "warmup")


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool("cuobjdump"), *flags, path], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """{'REG', 'SHARED', 'LOCAL', 'STACK'} of the one function in ``cubin``, read by ``cuobjdump``."""
    usage = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", _cuobjdump(cubin, "--dump-resource-usage")))
    return {k: int(v) for k, v in usage.items()}


def _loop_bodies(cubin: bytes) -> list[tuple[int, int, int, int]]:
    """(first address, last address, instructions, tensor-core instructions) of every backward branch's body."""
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", _cuobjdump(cubin, "-sass"))]
    out = []
    for addr, op in code:
        target = re.search(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)", op)
        if target is None or int(target.group(1), 16) >= addr:
            continue
        start = int(target.group(1), 16)
        body = [o for a, o in code if start <= a <= addr]
        out.append((start, addr, len(body), sum(bool(re.search(r"\bH(GMMA|MMA)\b", o)) for o in body)))
    return out


def loops(cubin: bytes) -> list[tuple[int, int]]:
    """(instructions, tensor-core instructions) of the body of every innermost matrix loop of the kernel, and of
    every loop without matrix instructions. A matrix loop (one with HGMMA / HMMA) is dropped when it holds another
    (a persistent kernel's loop over output tiles holds its k-loops) or crosses one without nesting (the retry branch
    of a barrier wait, which jumps back into a k-loop from after it)."""
    bodies = _loop_bodies(cubin)
    matrix = [(a, b) for a, b, _, mma in bodies if mma]

    def inner(a: int, b: int) -> bool:
        holds = any(a <= c and d <= b and (c, d) != (a, b) for c, d in matrix)
        crosses = any(c < a <= d < b for c, d in matrix)  # starts inside another loop, ends after it
        return not holds and not crosses

    return [(n, mma) for a, b, n, mma in bodies if not mma or inner(a, b)]


def main_loop(cubin: bytes) -> tuple[int, int]:
    """(instructions, tensor-core instructions) in the body of the kernel's main loop, the innermost loop whose
    body holds the most HGMMA / HMMA (the longest of those): what each loop step issues per warp next to its matrix
    instructions. (0, 0) without such a loop."""
    return max(loops(cubin), key=lambda item: (item[1], item[0]), default=(0, 0))


def full_loop(cubin: bytes) -> int:
    """Instructions per step of the shorter of two loops with the main loop's matrix instructions (the full-tile
    loop of a kernel with full and partial tile lists), else 0."""
    found = loops(cubin)
    _, mma = max(found, key=lambda item: (item[1], item[0]), default=(0, 0))
    same = sorted(n for n, m in found if m == mma and mma > 0)
    return same[0] if len(same) >= 2 else 0


def programs_per_sm(registers: int, shared: int, num_warps: int, limits: dict = SM90) -> int:
    """Programs resident on one SM: registers are allocated per warp in 256-register units (8 per thread)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = limits["registers"] // max(1, per_warp * num_warps)
    by_shared = limits["shared"] // (shared + limits["reserved_shared"])
    return min(by_regs, by_shared, limits["programs"], limits["warps"] // num_warps)


def describe(kernel: str, key: tuple, config: dict, compiled) -> Compiled:
    """The figures of one ``triton.compiler.CompiledKernel``."""
    ptx = compiled.asm["ptx"]
    usage = resource_usage(compiled.asm["cubin"])
    loop_instructions, loop_mma = main_loop(compiled.asm["cubin"])
    shared = int(compiled.metadata.shared)
    warps = int(config.get("num_warps", 4))
    return Compiled(
        kernel=kernel,
        key=key,
        config=dict(config),
        shared=shared,
        registers=usage.get("REG", 0),
        local=usage.get("LOCAL", 0),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        mma=len(re.findall(r"\bmma\.sync", ptx)),
        cp_async=len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
        tma=len(re.findall(r"\bcp\.async\.bulk", ptx)),
        programs_per_sm=programs_per_sm(usage.get("REG", 0), shared, warps),
        loop_instructions=loop_instructions,
        loop_mma=loop_mma,
        full_loop_instructions=full_loop(compiled.asm["cubin"]),
    )


@contextlib.contextmanager
def patched(patches: list[tuple[object, str, object]]) -> Iterator[None]:
    """Within: each ``(owner, name, value)`` set as ``owner.name = value``; the old values are restored after."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@contextlib.contextmanager
def cuda_decisions(sms: int = H100_SMS) -> Iterator[None]:
    """Within: ``lthfast.kernels``' launchers take on CPU tensors the decisions they take on a CUDA device with
    ``sms`` SMs (weight-tile shapes, tuner keys and configs, dW splits) instead of the interpreter's. Launches are
    left alone: callers replace them (``cuda_target`` compiles them, ``benchmarks/host_overhead.py`` stubs them)."""
    from lthfast import _backend
    from lthfast.kernels import dw_split, masked_conv, masked_matmul, persistent

    cuda = torch.device("cuda", 0)
    split_count, conv_tiles = dw_split.split_count, masked_conv.conv_tiles
    dead_per_program = dw_split.dead_per_program
    with patched([
        (_backend, "interpreter_enabled", lambda: False),
        (masked_matmul, "_interpreted", lambda t: False),
        (masked_conv, "conv_tiles", lambda device: conv_tiles(cuda)),
        (masked_conv, "_sm_count", lambda device: sms),
        (dw_split, "split_count", lambda m, programs, device: split_count(m, programs, cuda)),
        (dw_split, "dead_per_program", lambda dead, device: dead_per_program(dead, cuda)),
        (dw_split, "_sm_count", lambda index: sms),
        (persistent, "_interpreted", lambda t: False),
        (persistent, "_sm_count", lambda device: sms),
        (persistent, "_tma_capable", lambda device: True),  # the targets here are sm_90
    ]):  # fmt: skip
        yield


def tuned_kernels() -> list:
    """Every ``Tuned`` kernel of ``lthfast.kernels`` (the linear and conv GEMMs, classic and persistent)."""
    from lthfast.kernels import masked_conv, masked_matmul, persistent
    from lthfast.kernels.autotune import Tuned

    modules = (masked_matmul, masked_conv, persistent)
    return [v for module in modules for v in vars(module).values() if isinstance(v, Tuned)]


@contextlib.contextmanager
def cuda_target(
    arch: int = 90, sms: int = H100_SMS, all_configs: bool = True, variants: bool = True
) -> Iterator[list[Compiled]]:
    """Within: calls of ``lthfast.kernels``' launchers on CPU tensors take the CUDA path for a GPU of ``arch``
    with ``sms`` SMs (``cuda_decisions``), and each launch compiles its candidate configs (only the first unless
    ``all_configs``) instead of running; outputs are left unwritten. Where a launcher chooses among kernels
    (``autotune.Faster``: one-program-per-tile or persistent), every one compiles, or only the first without
    ``variants``. Yields the list the ``Compiled`` records are
    appended to. Not thread-safe: it swaps Triton's active driver for the block.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("lthfast.bench.offline: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    from triton.runtime.driver import driver

    from lthfast.kernels.autotune import Faster, Tuned

    records: list[Compiled] = []

    def pick(self, key, runs, timed=True):  # the other variants compile here; the caller then runs the first
        for run in runs[1:] if variants else ():
            run()
        return 0

    def launch(self, key, grid, *args, fixed=None, **kwargs):
        if fixed is not None:
            configs = [fixed]
        else:
            configs = self.candidates(key) if all_configs else self.candidates(key)[:1]
        for config in configs:
            compiled = self.kernel.warmup(*args, grid=grid(config), **kwargs, **config)
            records.append(describe(self.kernel.__name__, key, config, compiled))

    active = driver._active  # None on a machine without a GPU: Triton creates its driver on first use
    driver.set_active(_Driver(arch))
    try:
        with cuda_decisions(sms), patched([(Tuned, "launch", launch), (Faster, "pick", pick)]):
            yield records
    finally:
        driver._active = active
        for tuned in tuned_kernels():
            getattr(tuned.kernel, "device_caches", {}).pop(_DEVICE_KEY, None)
