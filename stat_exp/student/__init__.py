"""The student model: building, loading, prompting and sampling from it."""
