.PHONY: install test quickstart bench

install:
	bash scripts/install.sh

# The README's test command: installs what the tests need, then runs the whole suite on both cores: two
# pytest workers, whole files each (their module fixtures stay in one process), one torch thread each (two
# threads per worker on two cores oversubscribe them; the numeric bounds hold under 1 and 2 threads).
test: install
	OMP_NUM_THREADS=1 python -m pytest -q -n 2 --dist loadfile

quickstart:
	./quickstart.sh

# Benchmarks write JSON to bench/results/ (timings live here, never in tests).
bench: install
	python bench/bench_train.py --out bench/results/train.json
	python bench/bench_methods.py --out bench/results/methods.json
	python bench/bench_loading.py --out bench/results/loading.json
	python bench/bench_distributed.py --out bench/results/distributed.json
	python bench/bench_speed.py --out bench/results/speed.json
