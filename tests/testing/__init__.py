"""Tests of shared_ollama.testing (the FakeEngine), over real HTTP on 127.0.0.1."""
