"""Embeddings -> strata (AP grid), their checks, phenotype factors and statistics."""
