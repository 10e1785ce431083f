"""Prompts of different lengths, so left padding matters (the tiny tokenizer is character-level)."""

PROMPTS = [
    "How do I bake bread?",
    "Write a poem about the sea.",
    "Explain photosynthesis to a child in three sentences.",
    "Hi",
    "List five prime numbers and say why they are prime.",
    "What is 2+2?",
]
