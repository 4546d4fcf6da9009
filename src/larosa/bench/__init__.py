"""``larosa bench``: GPU speed on random weights of real shapes (Top-K fixes k, so the bytes read, and the speed,
do not depend on the weights): the decode engine end to end, and the kernels one projection at a time."""
