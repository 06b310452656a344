"""One HTML/Markdown report over every stage folder of a run."""
