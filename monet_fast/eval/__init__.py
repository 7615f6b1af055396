"""monet_fast.eval."""
