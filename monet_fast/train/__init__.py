"""monet_fast.train."""
