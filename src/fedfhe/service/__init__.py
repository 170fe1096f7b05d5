"""Encrypted inference over HTTP: the client keeps its keys, the server only sees ciphertexts."""
