"""Pictures: confusion matrices, training curves, attention maps. They are written to files,
never shown, so matplotlib draws without a display."""

import matplotlib

matplotlib.use("Agg")
