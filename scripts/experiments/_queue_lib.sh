# Sourced by the study queues (converged_queue.sh, documents_queue.sh): run the entries of QUEUE
# ("label|runner arguments") with the runner command R on LANES parallel lanes, each lane taking
# the next entry that no other lane has claimed (a folder under CLAIMS) and whose label matches
# ONLY (a bash pattern; empty: all). While work/experiments/queue.pause exists, the lanes finish
# the runs they are in and start no new one. A failed run is reported and the lane goes on.
# Claims hold within one queue only (a queue clears them when it starts); a run that a lane of
# another queue is training holds a lock (work/experiments/runs/<run>.lock), and the runner skips it.
#
#   run_queue CLAIMS_DIR

lane() {
    local claims=$1 lane_no=$2 i entry label args
    for i in "${!QUEUE[@]}"; do
        entry=${QUEUE[$i]}
        label=${entry%%|*}
        args=${entry#*|}
        # shellcheck disable=SC2053  # ONLY is a pattern on purpose
        [[ -z "${ONLY:-}" || "$label" == $ONLY ]] || continue
        while [[ -e work/experiments/queue.pause ]]; do sleep 30; done
        mkdir "$claims/$i" 2>/dev/null || continue # another lane has it
        echo "[queue $(date +%H:%M:%S)] lane $lane_no: $label ($((i + 1)) of ${#QUEUE[@]})"
        # shellcheck disable=SC2086  # args is a word list written by the queue
        if ! "${R[@]}" $args; then
            echo "[queue $(date +%H:%M:%S)] lane $lane_no: $label FAILED; going on with the next"
        fi
    done
    echo "[queue $(date +%H:%M:%S)] lane $lane_no: nothing left"
}

run_queue() {
    local claims=$1 l
    rm -rf "$claims"
    mkdir -p "$claims"
    for ((l = 1; l <= ${LANES:-2}; l++)); do
        lane "$claims" "$l" &
        sleep 5 # the lanes' first runs do not export the code snapshot at the same moment
    done
    wait
}
