"""Data sets, timm transforms, seeded samplers and loaders."""
