"""The GGUF format (llama.cpp's): its adapter and the modules only it uses."""
