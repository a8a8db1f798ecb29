"""What runs show: paired statistics and aggregated tables (``stats``), figures (``figures``)
and self-contained HTML pages (``html``); ``contraseg.experiment`` assembles them for a grid."""
