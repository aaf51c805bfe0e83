# The README's commands. Each one first makes sure .venv/ is set up (seconds when it is).
PY := .venv/bin/python
DEMO_CFG := configs/demo_pvt_dge_synthetic.yaml
DEMO_OUT := output/demo

.PHONY: setup demo test budget-curves estimator-ab

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

# One pytest-xdist worker per core, each on one thread (tests/conftest.py).
test: setup
	$(PY) -m pytest -q -n auto --dist worksteal tests

# Accuracy against budget (README): the demo model recalibrated to six β, the demo trained at
# γ = 0.25 and 0.75, and the vanilla model on smaller inputs; models already trained are reused.
budget-curves: setup
	test -f $(DEMO_OUT)/model_final.pth || $(MAKE) demo
	for g in 0.25 0.75; do test -f $(DEMO_OUT)_g$$g/model_final.pth || \
		$(PY) train_net.py --config-file $(DEMO_CFG) MODEL.DGE.BUDGET $$g OUTPUT_DIR $(DEMO_OUT)_g$$g || exit 1; done
	test -f $(DEMO_OUT)_vanilla/model_final.pth || \
		$(PY) train_net.py --config-file $(DEMO_CFG) MODEL.DGE.ENABLED False OUTPUT_DIR $(DEMO_OUT)_vanilla
	$(PY) tools/calibrate_budget.py --config-file $(DEMO_CFG) --target-beta 0.3 0.4 0.5 0.6 0.8 1.0 \
		--images dge_synthetic_val MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth
	$(PY) tools/budget_curves.py --recalibrated $(DEMO_OUT)/model_final_budgets.pth \
		--trained $(DEMO_OUT)_g0.25 $(DEMO_OUT) $(DEMO_OUT)_g0.75 --vanilla $(DEMO_OUT)_vanilla \
		--output $(DEMO_OUT)/budget_curves

# The estimator A/B (projects/DGE/README.md): the demo and the Semantic FPN demo trained with
# each MODEL.DGE.ESTIMATOR over three seeds, then one table and the β-per-stage plots.
ESTIMATORS := paper official official_sparse
AB_OUT := output/estimator_ab
estimator-ab: setup
	for s in 0 1 2; do for e in $(ESTIMATORS); do \
		test -f $(AB_OUT)/demo_$${e}_s$$s/model_final.pth || $(PY) train_net.py --config-file $(DEMO_CFG) \
			MODEL.DGE.ESTIMATOR $$e SEED $$s OUTPUT_DIR $(AB_OUT)/demo_$${e}_s$$s || exit 1; done; done
	for s in 0 1 2; do for e in $(ESTIMATORS); do \
		test -f $(AB_OUT)/sem_$${e}_s$$s/model_final.pth || $(PY) train_net.py --config-file \
			configs/semantic_fpn_pvt_dge_synthetic.yaml MODEL.DGE.ESTIMATOR $$e SEED $$s \
			OUTPUT_DIR $(AB_OUT)/sem_$${e}_s$$s || exit 1; done; done
	$(PY) tools/plot_runs.py $(AB_OUT)/demo_* --merge-seeds --output $(AB_OUT)/demo
	$(PY) tools/plot_runs.py $(AB_OUT)/sem_* --merge-seeds --output $(AB_OUT)/sem
