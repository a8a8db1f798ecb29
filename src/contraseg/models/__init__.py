"""The UNet and its projection heads g1 (global) and g2 (local)."""
