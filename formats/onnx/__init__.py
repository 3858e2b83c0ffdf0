"""The onnx format: its adapter and the modules only it uses."""
