"""ONNX export of the autoencoders' encoders and decoders (`export`) and the ONNX Runtime inference
API the workers call (`runtime`, importable without torch)."""
