"""Output-length prediction: how long a reply a prompt will get, before it runs.

- `predictor`: the `LengthPredictor` protocol (prompts in, quantiles of the reply length in
  tokens out) and the CPU implementation, a proxy model over the prompt's text.
- `data`: the (prompt, response) table, labels in the served model's tokenizer, a split by id.
- `metrics`: Kendall tau, bucket accuracy, MAE, and the baselines they are read against.
- `online`: learning from the system's own completed requests, a live quality monitor, and the
  error injection the length-scheduling bench uses.

Nothing here imports vLLM, Ray or a tokenizer library at module level: the scheduler and the
controller import the pure parts; labelling imports `tokenizers` when it runs.
"""
