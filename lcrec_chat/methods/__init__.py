"""LLM recommenders from the same literature, trained beside LC-Rec on the same split: CLLM4Rec and CoLLM."""
