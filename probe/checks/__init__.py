"""One module per kind of check; each check is a small object with a `name` and an async `run()`."""
