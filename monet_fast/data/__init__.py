"""monet_fast.data."""
