"""The hdf5 format: its adapter and the modules only it uses."""
