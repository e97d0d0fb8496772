"""The controller: snapshots in, budgets out (pure policy), its actor loop, SLOs and admission."""
