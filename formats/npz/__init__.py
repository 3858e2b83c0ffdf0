"""NumPy ``.npz`` archives: the adapter (:mod:`.npz_format`) and its zip/.npy layer."""
