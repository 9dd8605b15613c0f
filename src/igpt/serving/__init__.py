"""`igpt serve`: the local web app and its page."""
