# `make demo` and `make test` are the two commands the README promises.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the package metadata changes; the stamp is how make knows.
STAMP := $(VENV)/.installed

.PHONY: setup test demo demo-dense demo-ssl bench bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt -e '.[dev]'
	touch $(STAMP)

# One worker per core, a test file per worker at a time (its module fixtures are built once).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

demo: $(STAMP)
	$(BIN)/xcit train -c configs/demo/digits_xcit.yaml

# A detector and a segmenter on the built-in digit_scenes, their backbone from `make demo`'s classifier
# (trained first when absent).
demo-dense: $(STAMP)
	test -f runs/digits_xcit/best.pth || $(BIN)/xcit train -c configs/demo/digits_xcit.yaml -o experiment=digits_xcit
	$(BIN)/xcit train -c configs/demo/scenes_maskrcnn.yaml
	$(BIN)/xcit train -c configs/demo/scenes_semfpn.yaml

# DINO on the built-in digit_places without their labels; draws the curve (runs/digits_dino/curves.png) and the
# teacher's attention on a few views, and ends with the k-NN line (pretrained, random init, raw pixels).
demo-ssl: $(STAMP)
	set -e; out=$$($(BIN)/xcit train -c configs/demo/digits_dino.yaml | tee /dev/stderr); \
	run=$$(printf '%s\n' "$$out" | sed -n 's/^run folder: //p' | tail -n 1); \
	test -n "$$run" || { echo 'demo-ssl: the pretraining did not finish' >&2; exit 1; }; \
	$(BIN)/python -c "import sys; from xcit.data.views import DigitPlaces; v = DigitPlaces('val', 64); \
		[v.load(i).save(f'{sys.argv[1]}/view_{i}.png') for i in range(4)]" "$$run"; \
	$(BIN)/xcit attention "$$run"/view_*.png --model xcit_nano_12_p8_224 --checkpoint "$$run/last.pth" \
		--image-size 64 --out "$$run/attention" > /dev/null; \
	echo "attention of the pretrained teacher on four val views: $$run/attention/"; \
	printf '%s\n' "$$out" | sed -n 's/^final evaluation: //p' | tail -n 1

bench: $(STAMP)
	$(BIN)/xcit bench -m xcit_nano_12_p16_224 --resolutions 224,384,512,768,1024 \
		--json bench-results/sweep.json --plot bench-results/sweep.png
	$(BIN)/xcit bench -m xcit_nano_12_p16_224 -b 32 --compare timm --json bench-results/compare.json

# The GPU run (BENCHMARKS.md, "GPU"): no venv, as on a machine that has torch and timm but no network;
# the wheels in .whl, where there are any, are installed to a private folder first.
GPU_OUT ?= benchmarks/results/h200
bench-gpu:
	bash benchmarks/gpu.sh $(GPU_OUT)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
