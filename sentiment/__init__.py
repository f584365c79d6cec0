"""The `sentiment` command (`cli`), and `sentiment serve`: Redis, the workers and the API on one machine
(`embedded`), its workers kept running by `supervisor`."""
