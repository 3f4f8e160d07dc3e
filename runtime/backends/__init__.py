"""Inference backends behind one small interface: ONNX Runtime and TensorRT."""
