"""Data for the course: generators from the knowledge base, real-dataset loaders, cleaning,
splits, augmentation. See ``generate``, ``loaders``, ``clean`` and ``augment``."""
