"""uniloop.policies."""
