#!/usr/bin/env bash
# The GPU check: one command, at most 8 minutes on one GPU, JSON results in a folder.
#
#   benchmarks/gpu_check.sh OUT_DIR            (PYTHON=/path/to/python to choose the interpreter)
#
# Parts, in order of importance, each under its own time limit and all under one budget
# (GPU_CHECK_BUDGET_S, default 450 s), so the whole command ends within 8 minutes:
#   1. environment.json          torch, CUDA, GPU, TF32 flags
#   2. cuda_tests.json           pytest -m cuda (tests/test_cuda.py): bf16 autocast in training and
#                                sampling, TF32, --compile, pinned-memory batches (+ cuda_tests.xml)
#   3. sampler_speed.json        benchmarks/sampler_speed.py --device cuda at the paper preset:
#                                batch sweep 1..256, seconds per 256² image with the tokenizer's
#                                decoding (--decode), against the paper's 0.086 s (RTX A6000)
#   4. train_throughput.json     benchmarks/train_throughput.py: 60 tokenizer and 300 prior steps
#                                at the paper preset through the real training loops
#   5. sampler_speed_compiled.json  the sampler with --compile at batches 64 and 256
#   6. summary.json              the headline numbers, each part's exit status and seconds
# Every part's output is kept in OUT_DIR/<part>.log. Nothing is downloaded: random weights and
# random data only.
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$SECONDS
STATUS="$OUT/parts.tsv"
: > "$STATUS"

# run_part NAME LIMIT_S COMMAND...: runs under min(LIMIT_S, what the budget has left), logs to NAME.log
run_part() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET - (SECONDS - START) - 15 ))  # 15 s: the kill grace and the summary
    local t=$(( limit < left ? limit : left ))
    if (( t < 20 )); then
        printf '%s\tskipped\t0\t0\n' "$name" >> "$STATUS"
        echo "== $name: skipped, the budget is spent"
        return
    fi
    echo "== $name (at most ${t}s)"
    local t0=$SECONDS
    timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$t" >> "$STATUS"
    echo "   exit $rc after $(( SECONDS - t0 ))s"
    tail -n 3 "$OUT/$name.log"
}

run_part environment 30 "$PY" - "$OUT/environment.json" <<'EOF'
import json, platform, sys
import torch
from pathar_aug.device import resolve_device
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
if torch.cuda.is_available():
    resolve_device("auto")
    props = torch.cuda.get_device_properties(0)
    info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
             "device_count": torch.cuda.device_count(), "capability": list(torch.cuda.get_device_capability(0)),
             "bf16_supported": torch.cuda.is_bf16_supported(),
             "matmul_fp32_precision": getattr(torch.backends.cuda.matmul, "fp32_precision", None)}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
sys.exit(0 if torch.cuda.is_available() else 3)
EOF

run_part cuda_tests 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
    --junitxml="$OUT/cuda_tests.xml"

run_part sampler_speed 150 "$PY" benchmarks/sampler_speed.py --device cuda --presets paper \
    --batches 1 8 32 64 128 256 --decode --note "gpu_check.sh" --out "$OUT/sampler_speed.json"

run_part train_throughput 110 "$PY" benchmarks/train_throughput.py --device cuda --preset paper \
    --steps 60 300 --out "$OUT/train_throughput.json"

run_part sampler_speed_compiled 130 "$PY" benchmarks/sampler_speed.py --device cuda --presets paper \
    --batches 64 256 --decode --compile --no-nocache --note "gpu_check.sh, --compile" \
    --out "$OUT/sampler_speed_compiled.json"

"$PY" - "$OUT" "$(( SECONDS - START ))" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])


def load(name):
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


summary = {"total_seconds": seconds, "goal_seconds_per_image": 0.02, "paper_seconds_per_image_a6000": 0.086,
           "parts": {}}
for line in (out / "parts.tsv").read_text().splitlines():
    name, rc, took, limit = line.split("\t")
    summary["parts"][name] = {"exit": rc if rc == "skipped" else int(rc), "seconds": int(took),
                              "limit_s": int(limit), "timed_out": rc in ("124", "137")}
summary["environment"] = load("environment.json")
try:
    suite = ET.parse(out / "cuda_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    tests = {"passed": sum(c["outcome"] == "passed" for c in cases),
             "failed": sum(c["outcome"] in ("failure", "error") for c in cases),
             "skipped": sum(c["outcome"] == "skipped" for c in cases), "cases": cases}
    (out / "cuda_tests.json").write_text(json.dumps(tests, indent=2) + "\n")
    summary["cuda_tests"] = {k: tests[k] for k in ("passed", "failed", "skipped")}
except (OSError, ET.ParseError, AttributeError):
    summary["cuda_tests"] = None
for name in ("sampler_speed", "sampler_speed_compiled"):
    report = load(f"{name}.json")
    if report is None:
        summary[name] = None
        continue
    rows = report["presets"]["paper"]["batches"]
    per_image = {b: r.get("seconds_per_image_with_decode", r["seconds_per_image"]) for b, r in rows.items()}
    best = min(per_image, key=per_image.get)
    summary[name] = {"seconds_per_image_with_decode": per_image,
                     "seconds_per_image_tokens_only": {b: r["seconds_per_image"] for b, r in rows.items()},
                     "best_batch": int(best), "best_seconds_per_image": per_image[best],
                     "meets_goal": per_image[best] <= 0.02}
train = load("train_throughput.json")
summary["train_throughput"] = None if train is None else {
    stage: {k: train[stage][k] for k in ("seconds_per_step", "batch", "peak_memory_gib") if k in train[stage]}
    for stage in ("tokenizer", "prior") if stage in train}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
echo "gpu check done in $(( SECONDS - START ))s: $OUT/summary.json"
