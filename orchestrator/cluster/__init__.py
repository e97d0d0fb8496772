"""The Ray cluster and the stack on it: bring up, tear down, status, batch job submission."""
