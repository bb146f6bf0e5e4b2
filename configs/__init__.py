"""uniloop.configs."""
