"""Metrics and whole-volume inference on the native grid."""
