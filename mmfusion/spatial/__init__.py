"""Spatial normalization: study template, T1w -> template registration, output grid."""
