"""Machinery shared by every model family: mesh, sharding, train state, loop, checkpoints."""
