"""Export stage (torch + onnx): ONNX fp32/fp16/int8 graphs, the explainer graph, TensorRT engines, parity."""
