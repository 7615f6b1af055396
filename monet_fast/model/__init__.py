"""monet_fast.model."""
