"""The IMP driver (train, prune, rewind, repeat)."""
