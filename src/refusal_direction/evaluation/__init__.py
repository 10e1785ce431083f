"""Scoring what a model wrote: refusal judges (`refusal`, `judges/`), the Llama Guard 2 safety score
(`safety`), capability checks (`capability`), statistics (`stats`) and re-scoring saved files (`scorefile`)."""
