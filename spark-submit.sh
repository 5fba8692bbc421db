#!/usr/bin/env bash
# Submit a seqclust job to any Spark master. See --help.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<'USAGE'
Usage: ./spark-submit.sh [--master URL] [spark-submit options] <job> [job arguments]

  <job>            a file in jobs/ without .py: pipeline, ingest, sessionize, train, embed,
                   cluster, evaluate, generate, export, stream. `pipeline` takes the same arguments as
                   `seqclust run` (--input, --output, --run-id, --labels, --conf, --set ...).
  --master URL     local[*] (default), spark://host:port, yarn, k8s://... ; also $SPARK_MASTER
  --env-archive F  ship a packed Python environment (a venv-pack .tar.gz with pyspark,
                   pyarrow, TensorFlow ...) to the executors: --archives F#environment and
                   executors run ./environment/bin/python (for workers without the packages)
  --pack-env       build build/seqclust-env.tar.gz first (a fresh venv with seqclust[local]
                   and venv-pack; reused while setup.py is unchanged), then ship it as above
  --dry-run        print the spark-submit command instead of running it
  other options    passed to spark-submit as they are (e.g. --executor-memory 4g,
                   --conf spark.executor.cores=2); options take one value each.

The package is shipped as build/seqclust.zip with --py-files, Delta's jars with --jars (the files
`make setup` resolved) or --packages (matching the installed delta-spark), and the --conf file of the job, if any, with --files.
Environment: SPARK_SUBMIT (spark-submit to use; default .venv/bin/spark-submit),
PYSPARK_PYTHON (worker interpreter; default .venv/bin/python).
USAGE
}

MASTER="${SPARK_MASTER:-local[*]}"
OPTS=()
ENV_ARCHIVE=""
PACK_ENV=0
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --pack-env) PACK_ENV=1; shift ;;
    --env-archive) [[ $# -ge 2 ]] || { echo "spark-submit.sh: --env-archive needs a file" >&2; exit 2; }; ENV_ARCHIVE="$2"; shift 2 ;;
    --master) [[ $# -ge 2 ]] || { echo "spark-submit.sh: --master needs a value" >&2; exit 2; }; MASTER="$2"; shift 2 ;;
    --master=*) MASTER="${1#--master=}"; shift ;;
    --*=*) OPTS+=("$1"); shift ;;
    --*) [[ $# -ge 2 ]] || { echo "spark-submit.sh: $1 needs a value" >&2; exit 2; }; OPTS+=("$1" "$2"); shift 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
JOB="$1"; shift
if [[ ! "$JOB" =~ ^[a-z_]+$ || ! -f "$HERE/jobs/$JOB.py" ]]; then
  echo "spark-submit.sh: unknown job '$JOB' (jobs: $(cd "$HERE/jobs" && ls *.py | sed 's/\.py$//' | tr '\n' ' '))" >&2
  exit 2
fi

PY="${PYSPARK_PYTHON:-$HERE/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
SUBMIT="${SPARK_SUBMIT:-$HERE/.venv/bin/spark-submit}"
[[ -x "$SUBMIT" ]] || SUBMIT="$(command -v spark-submit || true)"
[[ -n "$SUBMIT" ]] || { echo "spark-submit.sh: spark-submit not found; run 'make setup' or set SPARK_SUBMIT" >&2; exit 2; }

mkdir -p "$HERE/build"
# built under a name of its own, then renamed: a submit running at the same moment never
# ships a half-written zip
(cd "$HERE/lib" && SEQCLUST_ZIP_TMP="../build/seqclust.zip.$$" "$PY" - <<'PYZIP'
import os, zipfile
tmp = os.environ["SEQCLUST_ZIP_TMP"]
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
    for root, dirs, files in os.walk("seqclust"):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if not f.endswith(".pyc"):
                z.write(os.path.join(root, f))
os.replace(tmp, "../build/seqclust.zip")
PYZIP
)

# Delta's jars: the local files an earlier start resolved (`make setup` warms them up), else the
# Maven coordinate for Ivy to resolve (a second of work and ~60 lines on stderr)
DELTA_PY='from seqclust.runtime.spark import cached_delta_jars, delta_package
jars = cached_delta_jars()
print("--jars", ",".join(jars)) if jars else print("--packages", delta_package())'
DELTA_OPT="$("$PY" -c "$DELTA_PY" 2>/dev/null || true)"
if [[ -z "$DELTA_OPT" ]]; then
  DELTA_OPT="$(PYTHONPATH="$HERE/lib" "$PY" -c "$DELTA_PY")"
fi
read -r DELTA_FLAG DELTA_VALUE <<<"$DELTA_OPT"
# the JVM's own logging at WARN, minus the warnings of things seqclust does on purpose
LOG_OPTS=()
if [[ -f "$HERE/lib/seqclust/runtime/log4j2.properties" ]]; then
  LOG_OPTS=(--conf "spark.driver.extraJavaOptions=-Dlog4j2.configurationFile=file:$HERE/lib/seqclust/runtime/log4j2.properties")
fi
[[ "$MASTER" == local* ]] && export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"

FILES=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ "${args[$i]}" == "--conf" && $((i + 1)) -lt ${#args[@]} && -f "${args[$((i + 1))]}" ]]; then
    FILES=(--files "${args[$((i + 1))]}")
  fi
done

if [[ $PACK_ENV == 1 ]]; then
  ENV_ARCHIVE="$HERE/build/seqclust-env.tar.gz"
  if [[ ! -f "$ENV_ARCHIVE" || "$HERE/setup.py" -nt "$ENV_ARCHIVE" ]]; then
    echo "spark-submit.sh: packing the Python environment into $ENV_ARCHIVE (a few minutes, once)" >&2
    rm -rf "$HERE/build/pack-venv" "$ENV_ARCHIVE"
    "$(command -v python3)" -m venv "$HERE/build/pack-venv"
    "$HERE/build/pack-venv/bin/pip" install --quiet "$HERE[local]" venv-pack
    "$HERE/build/pack-venv/bin/venv-pack" -q -p "$HERE/build/pack-venv" -o "$ENV_ARCHIVE"
  fi
fi
ARCHIVE_OPTS=()
export PYSPARK_DRIVER_PYTHON="$PY"
if [[ -n "$ENV_ARCHIVE" ]]; then
  [[ -f "$ENV_ARCHIVE" ]] || { echo "spark-submit.sh: --env-archive $ENV_ARCHIVE: no such file" >&2; exit 2; }
  # executors unpack it as ./environment; the driver (client mode) keeps this interpreter
  ARCHIVE_OPTS=(--archives "$ENV_ARCHIVE#environment" --conf spark.pyspark.python=./environment/bin/python
                --conf spark.pyspark.driver.python="$PY")
  export PYSPARK_PYTHON=./environment/bin/python
else
  export PYSPARK_PYTHON="$PY"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
CMD=("$SUBMIT" \
  --master "$MASTER" \
  --name "seqclust-$JOB" \
  --py-files "$HERE/build/seqclust.zip" \
  "$DELTA_FLAG" "$DELTA_VALUE" \
  --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension \
  --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog \
  --conf spark.ui.showConsoleProgress=false \
  --conf spark.executorEnv.TF_CPP_MIN_LOG_LEVEL="$TF_CPP_MIN_LOG_LEVEL" \
  "${LOG_OPTS[@]}" \
  "${FILES[@]}" \
  "${ARCHIVE_OPTS[@]}" \
  "${OPTS[@]}" \
  "$HERE/jobs/$JOB.py" "$@")
if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
