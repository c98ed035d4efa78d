"""Deployment formats: ONNX (and TorchScript)."""
from .onnx import export_onnx, export_torchscript

__all__ = ['export_onnx', 'export_torchscript']
