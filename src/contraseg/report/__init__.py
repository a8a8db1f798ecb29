"""Figures, the markdown report of the demo and the self-contained HTML report."""
