.PHONY: install test quickstart bench

install:
	bash scripts/install.sh

# The README's test command: installs what the tests need, then runs the whole suite.
test: install
	python -m pytest -q

quickstart:
	./quickstart.sh

# Benchmarks write JSON to bench/results/ (timings live here, never in tests).
bench: install
	python bench/bench_train.py --out bench/results/train.json
	python bench/bench_methods.py --out bench/results/methods.json
	python bench/bench_loading.py --out bench/results/loading.json
	python bench/bench_distributed.py --out bench/results/distributed.json
	python bench/bench_speed.py --out bench/results/speed.json
