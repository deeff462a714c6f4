"""Pictures the tests make themselves."""
import numpy as np


def photo(seed=0, size=(80, 60)):
    """A smooth colour picture (survives JPEG), different per seed."""
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    return np.stack([127.5 + 127 * np.sin(4 * x + 3 * y + p) for p in phase], -1).astype(np.uint8)
