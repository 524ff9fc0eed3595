"""The teacher: a strong LLM that builds the skill catalogue, labels, diagnoses and writes new problems."""
