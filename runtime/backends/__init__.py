"""Backends by device name (the `--device` of evar-bench), imported only when chosen: torch is imported
by the torch reference alone, coremltools by the Core ML backend alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evar.errors import EvarError
from evar.runtime.backends.base import Backend, BackendUnavailable, require_macos
from evar.contract import Artifact


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # ort | torch | coreml
    compute_units: str  # bench JSON spelling (Swift ComputeUnits)
    macos_only: bool = False
    help: str = ""


DEVICES = {d.name: d for d in (
    Device("cpu", "ort", "cpuOnly", help="onnxruntime, CPU execution provider (ONNX artifacts)"),
    Device("torch-cpu", "torch", "cpuOnly", help="PyTorch eager reference of the artifact's model (the `evar sample` path)"),
    Device("ort-coreml", "ort-coreml", "cpuAndNeuralEngine", True, "onnxruntime with the Core ML execution provider (macOS)"),
    Device("coreml-cpu", "coreml", "cpuOnly", True, "Core ML, CPU only (Core ML artifacts, macOS)"),
    Device("coreml-gpu", "coreml", "cpuAndGPU", True, "Core ML, CPU and GPU (macOS)"),
    Device("ane", "coreml", "cpuAndNeuralEngine", True, "Core ML, CPU and Neural Engine (macOS)"),
)}


def device(name: str) -> Device:
    if name not in DEVICES:
        raise EvarError(f"unknown device '{name}': choose one of {', '.join(DEVICES)}")
    return DEVICES[name]


def check_available(name: str) -> Device:
    """Fail fast (before any artifact is read) when the device cannot exist on this OS."""
    d = device(name)
    if d.macos_only:
        require_macos(f"--device {name}")
    return d


def create(name: str, artifact: Artifact, threads: int | None = None, io_binding: bool = True,
           model: Any = None) -> Backend:
    d = check_available(name)
    if d.kind == "ort":
        from evar.runtime.backends.ort import OrtBackend

        return OrtBackend(artifact, threads, io_binding)
    if d.kind == "ort-coreml":
        from evar.runtime.backends.ort import OrtBackend

        return OrtBackend(artifact, threads, io_binding, execution_provider="coreml", compute_units=d.compute_units)
    if d.kind == "torch":
        from evar.runtime.backends.torch_ref import TorchBackend

        return TorchBackend(artifact, threads, model)
    if artifact.sampling_where == "host":  # the manifest says where sampling runs: follow it
        from evar.runtime.backends.coreml_host import CoremlHostBackend

        return CoremlHostBackend(artifact, d.compute_units, name)
    from evar.runtime.backends.coreml import CoremlBackend

    return CoremlBackend(artifact, d.compute_units, name)


__all__ = ["Backend", "BackendUnavailable", "DEVICES", "Device", "check_available", "create", "device"]
