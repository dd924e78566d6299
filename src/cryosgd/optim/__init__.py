"""Optimisers as small state transforms: ``init(x) -> state``, ``update(...) -> (x, state, info)``.

Their state is a dict of tensors and numbers, so it goes into checkpoints as it is.
"""
