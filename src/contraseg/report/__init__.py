"""What runs show: paired statistics and aggregated tables (``stats``), figures, the demo's
markdown report and the self-contained HTML report."""
