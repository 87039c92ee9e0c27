"""One op per module: reference, launchers, autograd, public functional."""
