"""`avatar bench live` and its headless client (client.py, also the tests' client)."""
