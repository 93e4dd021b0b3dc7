"""Inputs and outputs at the edges: BIDS discovery, image loading, derivatives, shards, atomic writes."""
