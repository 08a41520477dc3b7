"""Task scores beside perplexity: execution sandbox for generated code (HumanEval) and friends."""
