"""Shards -> normalized tensors -> trained autoencoders -> embeddings."""
