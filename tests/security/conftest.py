"""The security tier: attacks of issue 12 against a live fleet (real RabbitMQ, real processes).

Each test module marks itself (``broker``, ``db``); a test reproduces one attack as an attacker
would run it and asserts that it had no effect."""
