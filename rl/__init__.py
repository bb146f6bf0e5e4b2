"""uniloop.rl."""
