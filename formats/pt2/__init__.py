"""The pt2 format (``torch.export.save``): its adapter and the module only it uses."""
