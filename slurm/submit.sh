#!/usr/bin/env bash
# Submit an mmfusion analysis to SLURM: [template job] -> participant array -> the group
# level as a DAG: a GPU job array over the CV folds and the final model's job side by side,
# then the analysis job (afterok on all of them).
#
#   slurm/submit.sh BIDS_DIR OUT_DIR [options] [-- run.py options for every level]
#
# Options:
#   --template                 also run the template level first (participants wait: afterok)
#   --no-participant           do not submit the participant array (shards already exist)
#   --no-group                 do not submit the group job
#   --participant-label L ...  only these subjects (with or without 'sub-'); default: every
#                              participant_id of BIDS_DIR/participants.tsv (else every sub-* folder)
#   --labels FILE              only the subjects listed in FILE (one per line)
#   --throttle K               at most K participant tasks at once (default 50): --array=0-(N-1)%K
#   --allow-missing            group level: go on with the subjects whose participant task
#                              succeeded (default: the group level refuses and lists the missing)
#   --config FILE              passed to every level (and bound into the container)
#   -w, --work-dir DIR         passed to every level (and bound into the container)
#   --partition P, --account A, --qos Q      passed to every sbatch
#   --participant-cpus N (4)  --participant-mem M (8G)  --participant-time T (02:00:00)
#   --group-cpus N (8)  --group-mem M (32G)  --group-time T (24:00:00)  --group-nodes N (1)
#   --template-cpus N (8)  --template-mem M (16G)  --template-time T (12:00:00)
#   --group-gres G             default $MMFUSION_GROUP_GRES, else gpu:1; '' = no GPU request
#   --group-single             the group level as ONE job (group.sbatch, --group-* resources), not
#                              the DAG; needed for --group-nodes > 1 (multi-node training)
#   --cv-folds K               folds of the array (default: training.cv_folds of --config, else 10)
#   --folds-per-gpu N (1)      folds trained concurrently in one array task (sharing its GPU)
#   --fold-time T (24:00:00)  --final-time T (24:00:00): per training job (cpus, mem, gres: --group-*);
#                              a job warned --signal-lead seconds before T checkpoints and requeues itself
#   --signal-lead S (300)      seconds before the time limit at which SLURM sends SIGUSR1
#   --analysis-cpus N (8)  --analysis-mem M (32G)  --analysis-time T (04:00:00): the analysis job (no GPU)
#   --dry-run                  print the sbatch commands; submit nothing
# Environment: MMFUSION_CONTAINER=/path/mmfusion.sif runs every level in Apptainer
# (apptainer run --cleanenv --containall -B ...); MMFUSION_BIND=extra,paths; MMFUSION_GROUP_GRES.
# Output (stdout): template_job_id=ID, participant_job_id=ID, then fold_job_id=ID (the array),
# final_job_id=ID, analysis_job_id=ID; with --group-single group_job_id=ID (the ones submitted).
# Logs: OUT_DIR/logs/slurm/%x-%A-%a.out (array), %x-%j.out (others);
# per-task exit codes: OUT_DIR/logs/slurm/participant_status.tsv.
# Exit: 0 submitted; 64 usage error; 66 missing input (bids_dir, participants, container);
# 69 sbatch not available; 1 sbatch refused a job (jobs submitted before it are listed).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOME_DIR=$(dirname "$HERE")

die() { echo "submit.sh: error: $2" >&2; exit "$1"; }
info() { echo "submit.sh: $*" >&2; }
usage() { sed -n '2,44p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

[ $# -ge 1 ] && { [ "$1" = -h ] || [ "$1" = --help ]; } && { usage; exit 0; }
[ $# -ge 2 ] || die 64 "need BIDS_DIR and OUT_DIR (see slurm/submit.sh --help)"
BIDS_DIR=$1
OUT_DIR=$2
shift 2

DO_TEMPLATE=0 DO_PARTICIPANT=1 DO_GROUP=1 DRY_RUN=0 ALLOW_MISSING=0
LABELS=() LABELS_FILE="" THROTTLE=50 CONFIG="" WORK_DIR=""
SBATCH_COMMON=()
P_CPUS=4 P_MEM=8G P_TIME=02:00:00
G_CPUS=8 G_MEM=32G G_TIME=24:00:00 G_NODES=1
T_CPUS=8 T_MEM=16G T_TIME=12:00:00
G_GRES=${MMFUSION_GROUP_GRES-gpu:1}
G_SINGLE=0 CV_FOLDS="" PER_GPU=1 FOLD_TIME=24:00:00 FINAL_TIME=24:00:00 SIGNAL_LEAD=300
A_CPUS=8 A_MEM=32G A_TIME=04:00:00
PASS=()

need_value() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2:0:2}" != -- ] || die 64 "option $1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --template) DO_TEMPLATE=1; shift ;;
        --no-participant) DO_PARTICIPANT=0; shift ;;
        --no-group) DO_GROUP=0; shift ;;
        --participant-label|--participant_label)
            shift
            while [ $# -gt 0 ] && [ "${1:0:1}" != - ]; do LABELS+=("${1#sub-}"); shift; done
            [ ${#LABELS[@]} -gt 0 ] || die 64 "--participant-label needs at least one label" ;;
        --labels) need_value "$@"; LABELS_FILE=$2; shift 2 ;;
        --throttle) need_value "$@"; THROTTLE=$2; shift 2 ;;
        --allow-missing) ALLOW_MISSING=1; shift ;;
        --config) need_value "$@"; CONFIG=$2; shift 2 ;;
        -w|--work-dir) need_value "$@"; WORK_DIR=$2; shift 2 ;;
        --partition|--account|--qos) need_value "$@"; SBATCH_COMMON+=("$1=$2"); shift 2 ;;
        --participant-cpus) need_value "$@"; P_CPUS=$2; shift 2 ;;
        --participant-mem) need_value "$@"; P_MEM=$2; shift 2 ;;
        --participant-time) need_value "$@"; P_TIME=$2; shift 2 ;;
        --group-cpus) need_value "$@"; G_CPUS=$2; shift 2 ;;
        --group-mem) need_value "$@"; G_MEM=$2; shift 2 ;;
        --group-time) need_value "$@"; G_TIME=$2; shift 2 ;;
        --group-nodes) need_value "$@"; G_NODES=$2; shift 2 ;;
        --group-gres) [ $# -ge 2 ] || die 64 "option --group-gres needs a value ('' for none)"; G_GRES=$2; shift 2 ;;
        --group-single) G_SINGLE=1; shift ;;
        --cv-folds) need_value "$@"; CV_FOLDS=$2; shift 2 ;;
        --folds-per-gpu) need_value "$@"; PER_GPU=$2; shift 2 ;;
        --fold-time) need_value "$@"; FOLD_TIME=$2; shift 2 ;;
        --final-time) need_value "$@"; FINAL_TIME=$2; shift 2 ;;
        --signal-lead) need_value "$@"; SIGNAL_LEAD=$2; shift 2 ;;
        --analysis-cpus) need_value "$@"; A_CPUS=$2; shift 2 ;;
        --analysis-mem) need_value "$@"; A_MEM=$2; shift 2 ;;
        --analysis-time) need_value "$@"; A_TIME=$2; shift 2 ;;
        --template-cpus) need_value "$@"; T_CPUS=$2; shift 2 ;;
        --template-mem) need_value "$@"; T_MEM=$2; shift 2 ;;
        --template-time) need_value "$@"; T_TIME=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; PASS=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) die 64 "unknown option '$1' (run.py options go after '--'; see slurm/submit.sh --help)" ;;
    esac
done
for pair in "--throttle:$THROTTLE" "--participant-cpus:$P_CPUS" "--group-cpus:$G_CPUS" \
            "--template-cpus:$T_CPUS" "--group-nodes:$G_NODES" "--folds-per-gpu:$PER_GPU" \
            "--signal-lead:$SIGNAL_LEAD" "--analysis-cpus:$A_CPUS" ${CV_FOLDS:+"--cv-folds:$CV_FOLDS"}; do
    [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die 64 "${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[ "$G_NODES" -eq 1 ] || [ "$G_SINGLE" -eq 1 ] \
    || die 64 "--group-nodes $G_NODES trains one model over several nodes: add --group-single (the DAG runs each step on one node)"

# ---- inputs -------------------------------------------------------------------------------
[ -d "$BIDS_DIR" ] || die 66 "$BIDS_DIR: BIDS_DIR does not exist; give the root of a BIDS dataset"
BIDS_DIR=$(cd "$BIDS_DIR" && pwd)
[ -f "$BIDS_DIR/dataset_description.json" ] \
    || die 66 "$BIDS_DIR: not a BIDS dataset (no dataset_description.json); give the dataset's root folder"
if [ -n "$CONFIG" ]; then
    [ -f "$CONFIG" ] || die 66 "$CONFIG: file given to --config does not exist"
    CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
fi
if [ -z "$CV_FOLDS" ]; then
    # training.cv_folds of the config (a top-level 'training:' block), else the default 10
    [ -n "$CONFIG" ] && CV_FOLDS=$(awk '/^[^[:space:]#]/ { section = $1 }
                                        section == "training:" && $1 == "cv_folds:" { print $2; exit }' "$CONFIG")
    CV_FOLDS=${CV_FOLDS:-10}
    [[ "$CV_FOLDS" =~ ^[1-9][0-9]*$ ]] || die 64 "$CONFIG: cannot read training.cv_folds ('$CV_FOLDS'); pass --cv-folds K"
fi
if [ -n "${MMFUSION_CONTAINER:-}" ]; then
    [ -f "$MMFUSION_CONTAINER" ] || die 66 "$MMFUSION_CONTAINER: MMFUSION_CONTAINER is not a file; build it (docs/hpc.md) or unset it"
    MMFUSION_CONTAINER=$(cd "$(dirname "$MMFUSION_CONTAINER")" && pwd)/$(basename "$MMFUSION_CONTAINER")
    export MMFUSION_CONTAINER
fi

# Labels: --participant-label, --labels FILE, participants.tsv, or the sub-* folders.
SUBSET=0
if [ ${#LABELS[@]} -gt 0 ]; then
    SUBSET=1
elif [ -n "$LABELS_FILE" ]; then
    [ -f "$LABELS_FILE" ] || die 66 "$LABELS_FILE: file given to --labels does not exist"
    mapfile -t LABELS < <(sed -e 's/\r$//' -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' \
                              -e 's/^sub-//' "$LABELS_FILE" | grep -v '^$' || true)
    [ ${#LABELS[@]} -gt 0 ] || die 66 "$LABELS_FILE: no participant labels in the file; list one per line"
    SUBSET=1
elif [ -f "$BIDS_DIR/participants.tsv" ]; then
    mapfile -t LABELS < <(awk -F'\t' 'NR == 1 { for (i = 1; i <= NF; i++) { sub(/\r$/, "", $i); if ($i == "participant_id") c = i }
                                                  if (!c) exit 3; next }
                                      { sub(/\r$/, "", $c); if ($c != "") { sub(/^sub-/, "", $c); print $c } }' \
                              "$BIDS_DIR/participants.tsv") \
        || die 66 "$BIDS_DIR/participants.tsv: no participant_id column; add it (BIDS) or pass --labels FILE"
else
    mapfile -t LABELS < <(find "$BIDS_DIR" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' -printf '%f\n' \
                              | sed 's/^sub-//' | sort)
fi
[ ${#LABELS[@]} -gt 0 ] \
    || die 66 "$BIDS_DIR: no participants (participants.tsv lists none and there is no sub-* folder); nothing submitted"
MISSING=()
for label in "${LABELS[@]}"; do
    [ -d "$BIDS_DIR/sub-$label" ] || MISSING+=("sub-$label")
done
[ ${#MISSING[@]} -eq 0 ] \
    || die 66 "$BIDS_DIR: no folder for ${MISSING[*]}; fix participants.tsv/the label list or the dataset; nothing submitted"

if [ "$DRY_RUN" -eq 0 ]; then
    command -v sbatch >/dev/null || die 69 "sbatch not found: run this on a SLURM login node (or use --dry-run)"
fi

# ---- outputs ------------------------------------------------------------------------------
# (--dry-run creates and writes nothing)
OUT_DIR=$(realpath -m "$OUT_DIR")
case "$OUT_DIR/" in "$BIDS_DIR/"*) die 73 "$OUT_DIR: OUT_DIR must not be inside BIDS_DIR" ;; esac
LOG_DIR=$OUT_DIR/logs/slurm
STAMP=$(date -u +%Y%m%dT%H%M%SZ)-$$
LABELS_PATH=$LOG_DIR/participants-$STAMP.txt
if [ "$DRY_RUN" -eq 0 ]; then
    mkdir -p "$LOG_DIR" || die 73 "$LOG_DIR: cannot create it; choose a writable OUT_DIR"
    printf '%s\n' "${LABELS[@]}" > "$LABELS_PATH"
fi
N=${#LABELS[@]}

export MMFUSION_HOME=${MMFUSION_HOME:-$HOME_DIR}
export MMFUSION_LABELS_FILE=$LABELS_PATH
export MMFUSION_STATUS_TSV=$LOG_DIR/participant_status.tsv
BINDS=${MMFUSION_BIND:-}
[ -n "$CONFIG" ] && BINDS=$BINDS${BINDS:+,}$(dirname "$CONFIG")
if [ -n "$WORK_DIR" ]; then
    WORK_DIR=$(realpath -m "$WORK_DIR")
    [ "$DRY_RUN" -eq 1 ] || mkdir -p "$WORK_DIR" || die 73 "$WORK_DIR: cannot create the work dir"
    BINDS=$BINDS${BINDS:+,}$WORK_DIR
fi
export MMFUSION_BIND=$BINDS

COMMON_ARGS=()
[ -n "$CONFIG" ] && COMMON_ARGS+=(--config "$CONFIG")
[ -n "$WORK_DIR" ] && COMMON_ARGS+=(-w "$WORK_DIR")
COMMON_ARGS+=("${PASS[@]}")

# ---- submission ---------------------------------------------------------------------------
SUBMITTED=()
# submit NAME DEPENDENCY SBATCH_ARGS... -- SCRIPT ARGS... ; sets JOB_ID
submit() {
    local name=$1 dep=$2 out
    shift 2
    local cmd=(sbatch --parsable "--job-name=mmfusion-$name" "${SBATCH_COMMON[@]}")
    [ -n "$dep" ] && cmd+=("--dependency=$dep" --kill-on-invalid-dep=yes)
    cmd+=("$@")
    if [ "$DRY_RUN" -eq 1 ]; then
        printf '%q ' "${cmd[@]}"
        echo
        JOB_ID="<$name>"
        return
    fi
    if ! out=$("${cmd[@]}"); then
        die 1 "sbatch refused the $name job${SUBMITTED[*]:+ (already submitted: ${SUBMITTED[*]})}"
    fi
    JOB_ID=${out%%;*}
    SUBMITTED+=("$name=$JOB_ID")
    echo "${name}_job_id=$JOB_ID"
}

DEP_PARTICIPANT=""
if [ "$DO_TEMPLATE" -eq 1 ]; then
    T_ARGS=()
    [ "$SUBSET" -eq 1 ] && T_ARGS=(--participant-label "${LABELS[@]}")
    submit template "" "--output=$LOG_DIR/%x-%j.out" "--cpus-per-task=$T_CPUS" "--mem=$T_MEM" \
        "--time=$T_TIME" "$HERE/template.sbatch" "$BIDS_DIR" "$OUT_DIR" "${T_ARGS[@]}" "${COMMON_ARGS[@]}"
    DEP_PARTICIPANT="afterok:$JOB_ID"
fi

DEP_GROUP=""
if [ "$DO_PARTICIPANT" -eq 1 ]; then
    submit participant "$DEP_PARTICIPANT" "--array=0-$((N - 1))%$THROTTLE" "--output=$LOG_DIR/%x-%A-%a.out" \
        "--cpus-per-task=$P_CPUS" "--mem=$P_MEM" "--time=$P_TIME" \
        "$HERE/participant.sbatch" "$BIDS_DIR" "$OUT_DIR" "${COMMON_ARGS[@]}"
    # afterany: the group job runs even if some subjects failed; it then refuses (listing
    # the missing subjects) unless --allow-missing was given.
    DEP_GROUP="afterany:$JOB_ID"
elif [ -n "$DEP_PARTICIPANT" ]; then
    DEP_GROUP=$DEP_PARTICIPANT
fi

if [ "$DO_GROUP" -eq 1 ]; then
    G_ARGS=()
    [ "$SUBSET" -eq 1 ] && G_ARGS+=(--participant-label "${LABELS[@]}")
    [ "$ALLOW_MISSING" -eq 1 ] && G_ARGS+=(--allow-missing)
    GRES=(--gres=none)
    [ -n "$G_GRES" ] && GRES=("--gres=$G_GRES")
    if [ "$G_SINGLE" -eq 1 ]; then
        submit group "$DEP_GROUP" "--output=$LOG_DIR/%x-%j.out" "--nodes=$G_NODES" --ntasks-per-node=1 \
            "--cpus-per-task=$G_CPUS" "--mem=$G_MEM" "--time=$G_TIME" "${GRES[@]}" \
            "$HERE/group.sbatch" "$BIDS_DIR" "$OUT_DIR" "${G_ARGS[@]}" "${COMMON_ARGS[@]}"
    else
        # Training steps: warned SIGNAL_LEAD s before their limit, they checkpoint and requeue
        # themselves (group.sbatch); --open-mode=append keeps one log across the restarts.
        TRAIN=(--nodes=1 --ntasks-per-node=1 "--cpus-per-task=$G_CPUS" "--mem=$G_MEM" "${GRES[@]}"
               "--signal=B:USR1@$SIGNAL_LEAD" --requeue --open-mode=append)
        TASKS=$(((CV_FOLDS + PER_GPU - 1) / PER_GPU))
        submit fold "$DEP_GROUP" "--array=1-$TASKS" "--output=$LOG_DIR/%x-%A-%a.out" "--time=$FOLD_TIME" "${TRAIN[@]}" \
            "--export=ALL,MMFUSION_GROUP_STEP=train-fold,MMFUSION_FOLDS_PER_TASK=$PER_GPU,MMFUSION_CV_FOLDS=$CV_FOLDS" \
            "$HERE/group.sbatch" "$BIDS_DIR" "$OUT_DIR" "${G_ARGS[@]}" "${COMMON_ARGS[@]}"
        FOLD_JOB=$JOB_ID
        submit final "$DEP_GROUP" "--output=$LOG_DIR/%x-%j.out" "--time=$FINAL_TIME" "${TRAIN[@]}" \
            "--export=ALL,MMFUSION_GROUP_STEP=train-final" \
            "$HERE/group.sbatch" "$BIDS_DIR" "$OUT_DIR" "${G_ARGS[@]}" "${COMMON_ARGS[@]}"
        FINAL_JOB=$JOB_ID
        # afterok on the whole array and the final model; the analysis itself also refuses
        # (exit 66) while a fold or the final model is unfinished.
        submit analysis "afterok:$FOLD_JOB:$FINAL_JOB" "--output=$LOG_DIR/%x-%j.out" --nodes=1 --ntasks-per-node=1 \
            "--cpus-per-task=$A_CPUS" "--mem=$A_MEM" "--time=$A_TIME" --gres=none \
            "--export=ALL,MMFUSION_GROUP_STEP=analysis" \
            "$HERE/group.sbatch" "$BIDS_DIR" "$OUT_DIR" "${G_ARGS[@]}" "${COMMON_ARGS[@]}"
    fi
fi
info "$N participant(s); logs and participant_status.tsv in $LOG_DIR"
