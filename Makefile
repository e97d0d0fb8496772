# The few commands a newcomer needs. Each one creates or reuses .venv by itself.
.PHONY: demo test test-unit test-integration test-gpu lint venv up down status bench bench-quick

venv:
	scripts/bootstrap

demo: venv  ## the main job: local cluster, tiny model, chat traffic + a batch job, a summary
	.venv/bin/colocate demo

test: venv  ## lint, then unit + integration tests (real Ray, real vLLM-on-CPU)
	.venv/bin/ruff check .
	.venv/bin/python -m pytest tests/unit tests/component tests/integration -q --durations=25

bench: venv  ## every policy side by side on the bench model (about 45 minutes: six 380-s chat runs)
	.venv/bin/colocate bench

bench-quick: venv  ## the same, short (about 4-5 minutes)
	.venv/bin/colocate bench --quick

test-unit: venv
	.venv/bin/python -m pytest tests/unit -q

test-integration: venv
	.venv/bin/python -m pytest tests/integration -q

test-gpu: venv  ## opt-in, on a GPU node with COLOCATE_EXTRA=gpu
	.venv/bin/python -m pytest tests/gpu -q -m gpu

lint: venv
	.venv/bin/ruff check .

up: venv
	.venv/bin/colocate up

down: venv
	.venv/bin/colocate down

status: venv
	.venv/bin/colocate status
