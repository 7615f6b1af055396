"""monet_fast.serve: `monet-fast serve`, an OpenAI-compatible chat server on the latent engine.

schema (request validation) -> messages (images) -> prepare (tokens, budget) -> scheduler
(continuous batching over `monet_fast.decode.slots`) -> app (FastAPI routes) -> cli.
FastAPI and uvicorn are optional dependencies (`pip install 'monet_fast[serve]'`).
"""
