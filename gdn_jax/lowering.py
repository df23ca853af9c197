"""Lowering for CUDA on a machine without a GPU, on every supported JAX.

The Pallas Triton lowering asks which GPU it lowers for (the compute capability decides the
instructions). Up to jax 0.10 it fell back to compute capability 9.0 when no GPU was
present; since jax 0.11 it raises "No supported GPU devices found, please specify an
abstract GPU device using AbstractDevice" unless the abstract mesh in context names an
abstract device. `abstract_gpu()` provides that context (an H100 by default) and `lower()`
traces and lowers a function inside it. Both also work on jax 0.10, where the context is
simply not consulted, so callers need no version switch.

    from gdn_jax.lowering import lower
    lowered = lower(fn, *args, platforms=("cuda",))          # or ("cpu", "cuda"), ...
    text = lowered.as_text()

With a GPU as JAX's default device, or when the abstract mesh in context already names an
abstract device, nothing is added: the real (or the caller's) device decides.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

# The device kind string an H100 SXM reports; the Triton lowering matches it to sm_90.
H100_DEVICE_KIND = "NVIDIA H100 80GB HBM3"
# The device kind a TPU v5e reports.
TPU_V5E_DEVICE_KIND = "TPU v5 lite"
GPU_PLATFORMS = ("cuda", "rocm", "gpu")
_AXIS = "gdn_abstract_gpu"


def _default_platform() -> str | None:
    try:
        return jax.devices()[0].platform
    except RuntimeError:  # no backend could be initialised at all
        return None


def _context_has_abstract_device() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return getattr(mesh, "abstract_device", None) is not None


@contextlib.contextmanager
def abstract_gpu(device_kind: str = H100_DEVICE_KIND, platform: str = "cuda") -> Iterator[None]:
    """Context in which Pallas Triton kernels lower for `device_kind` without that GPU.

    Enters a one-device abstract mesh naming the device, unless JAX's default device is a
    GPU already or the abstract mesh in context names an abstract device (then it does
    nothing). Trace and lower inside it; `compile()` may run outside.
    """
    if not isinstance(device_kind, str) or not device_kind:
        raise ValueError(f"abstract_gpu: device_kind must be a non-empty string like "
                         f"{H100_DEVICE_KIND!r}, got {device_kind!r}")
    if platform not in GPU_PLATFORMS:
        raise ValueError(f"abstract_gpu: platform must be one of {GPU_PLATFORMS}, got {platform!r}")
    if _default_platform() in GPU_PLATFORMS or _context_has_abstract_device():
        yield
        return
    # Auto axis: an Explicit one (the default axis type) would put shardings into the types
    # of every traced value and change how reshapes and gathers trace.
    mesh = AbstractMesh((1,), (_AXIS,), axis_types=(AxisType.Auto,), abstract_device=AbstractDevice(
        device_kind=device_kind, num_cores=None, platform=platform))
    with jax.sharding.use_abstract_mesh(mesh):
        yield


@contextlib.contextmanager
def abstract_tpu(device_kind: str = TPU_V5E_DEVICE_KIND, num_cores: int = 1) -> Iterator[None]:
    """Context in which Pallas Mosaic TPU kernels lower for `device_kind` without a TPU.

    jax >= 0.11 asks the abstract mesh for the TPU generation (VMEM size and the like) when
    lowering some Mosaic kernels; like `abstract_gpu`, it does nothing on a TPU or when the
    abstract mesh in context already names a device.
    """
    if not isinstance(device_kind, str) or not device_kind.startswith("TPU"):
        raise ValueError(f"abstract_tpu: device_kind must be a TPU device kind like "
                         f"{TPU_V5E_DEVICE_KIND!r}, got {device_kind!r}")
    if _default_platform() == "tpu" or _context_has_abstract_device():
        yield
        return
    mesh = AbstractMesh((1,), (_AXIS,), axis_types=(AxisType.Auto,), abstract_device=AbstractDevice(
        device_kind=device_kind, num_cores=num_cores, platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def _check_platforms(platforms: Any) -> tuple[str, ...]:
    if isinstance(platforms, str):
        platforms = (platforms,)
    if (not isinstance(platforms, Sequence) or not platforms
            or not all(isinstance(p, str) and p for p in platforms)):
        raise ValueError(f"lower: platforms must be a non-empty tuple of platform names such as "
                         f"('cuda',) or ('cpu', 'cuda'), got {platforms!r}")
    return tuple(platforms)


def lower(fn: Callable, *args, platforms: Sequence[str] = ("cuda",),
          device_kind: str = H100_DEVICE_KIND, **jit_kwargs) -> jax.stages.Lowered:
    """`jax.jit(fn, **jit_kwargs).trace(*args).lower(lowering_platforms=platforms)`.

    When `platforms` includes a GPU platform, tracing and lowering run inside
    `abstract_gpu(device_kind)`, so this works on a CPU-only machine on every supported JAX;
    else with "tpu" inside `abstract_tpu()`. The abstract mesh names one device, so on
    jax >= 0.11 a list with both a GPU and "tpu" gets the GPU: Mosaic TPU kernels that ask
    for the TPU generation then fail to lower (lower for ("tpu",) separately).
    `args` may be arrays or `jax.ShapeDtypeStruct`s; a multi-platform tuple such as
    ("cpu", "cuda") gives one module that dispatches on the platform at run time.
    """
    platforms = _check_platforms(platforms)
    gpu = next((p for p in platforms if p in GPU_PLATFORMS), None)
    if gpu:
        ctx = abstract_gpu(device_kind, gpu)
    elif "tpu" in platforms:
        ctx = abstract_tpu()
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        return jax.jit(fn, **jit_kwargs).trace(*args).lower(lowering_platforms=platforms)
