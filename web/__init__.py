"""The browser client (no build step), shipped inside the server package as `server.web` so an
installed `avatar serve` finds it; pyproject.toml maps this folder there."""
