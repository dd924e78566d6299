"""Optimisers as small composable transforms (``init``, ``probe``, ``update``), after optax."""
