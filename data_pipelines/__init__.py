"""Turning raw audio and text into UALM training examples."""
