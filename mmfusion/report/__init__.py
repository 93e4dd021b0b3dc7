"""The group report, the subject QC page and every figure."""
