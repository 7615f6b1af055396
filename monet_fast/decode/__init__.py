"""monet_fast.decode."""
