"""The runtime core: the graph executor (layered and staircase), feeds, prompts, budgets."""
