"""Pictures: confusion matrices, training curves, attention maps."""
