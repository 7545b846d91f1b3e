"""Students and teachers from timm, their weights, and the hooks that read their attention."""
