"""Server strategies (orchestration) and their pure math (no Flower imports in the math)."""
