"""`specdec bench`: specdec's methods side by side with transformers' generate(), on the same prompts."""
