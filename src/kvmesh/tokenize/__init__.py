"""Prompt tokenisation in the gateway, matching what the engine will see."""

from kvmesh.tokenize.tokenizer import Encoded, PromptTokenizer, TokenizerError

__all__ = ["Encoded", "PromptTokenizer", "TokenizerError"]
