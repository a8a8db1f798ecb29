"""Figures and the markdown report of the demo."""
