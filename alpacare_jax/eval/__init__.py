"""Evaluation: free-form judge table, benchmark suite, human study."""
