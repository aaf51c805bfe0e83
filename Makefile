# The README's commands. Each one first makes sure .venv/ is set up (seconds when it is).
PY := .venv/bin/python
DEMO_CFG := configs/demo_pvt_dge_synthetic.yaml
DEMO_OUT := output/demo

.PHONY: setup demo test

setup:
	bash tools/setup/setup_env.sh

# Train the demo model on the synthetic dataset (box/mask AP and β printed at the end),
# then draw its gate maps on validation images and on scikit-image's photographs.
demo: setup
	$(PY) train_net.py --config-file $(DEMO_CFG) OUTPUT_DIR $(DEMO_OUT)
	$(PY) tools/visualize_gates.py --config-file $(DEMO_CFG) --dataset dge_synthetic_val --max-images 6 \
		--output $(DEMO_OUT)/gates_val MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth
	$(PY) tools/visualize_gates.py --config-file $(DEMO_CFG) --output $(DEMO_OUT)/gates_photos \
		MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth

test: setup
	$(PY) -m pytest -q tests
