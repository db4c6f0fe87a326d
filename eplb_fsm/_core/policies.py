"""Policies beyond DeepSeek's: importing this module registers them."""
