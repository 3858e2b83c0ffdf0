"""The pt format: its adapter and the modules only it uses."""
