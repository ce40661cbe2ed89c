"""Prompt tokenisation in the gateway, matching what the engine will see."""

from kvmesh.tokenize.tokenizer import PromptTokenizer, TokenizerError

__all__ = ["PromptTokenizer", "TokenizerError"]
