"""The three training stages, their shared trainer loop and checkpoints."""
