#!/usr/bin/env bash
# The checks and benchmarks a session with a GPU (H100 / H200) runs, in priority order.
#
#   scripts/gpu_checks.sh RESULTS_DIR [STEP ...]     # default: every step
#
# A GPU is lent to few sessions and for minutes, so every step has its own time
# limit and writes its own log into RESULTS_DIR (a step that runs out of time
# costs only itself), and the folder is packed into RESULTS_DIR.tgz after each
# step (or into $GPU_CHECKS_ARCHIVE), so whatever finished survives the caller's
# own limit. The machine has no network: the model is the published Qwen2.5-0.5B
# shape with random weights, and the server's missing packages travel as wheels
# (docs/benchmarks.md, GPU section). First the unrolled layers' decode step traced back to
# back (the seventh GPU session found it fast synced and slow pipelined), then the served
# figures at batch 1 and 64, the host profile, structured output's cost and a fresh server's
# first burst; then profiles, step times and kernels; last, on a machine with two GPUs or more,
# tensor and data parallelism. A step's XLA flags add to $XLA_FLAGS, so a whole run can take a
# setting: XLA_FLAGS=--xla_gpu_enable_command_buffer= scripts/gpu_checks.sh ...
set -u
results=${1:?usage: scripts/gpu_checks.sh RESULTS_DIR [STEP ...]}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(env profile_decode_unrolled profile_decode serving_reference_b1
    serving_reference_b64 host_profile_b64 offline_b64 offline_tokenizer_b64 offline_constrained_b64
    serving_first_burst_b64 offline_b64_no_dispatch_thread offline_b64_while_graphs serving_unfused_b64
    one_batch_unfused one_batch_auto kernel_tests bench_kernels one_batch_decode one_batch_no_command_buffers
    one_batch_cublas one_batch_slice_fusion one_batch_cublas_slice_fusion one_batch_command_buffers
    one_batch_unrolled one_batch_unrolled_skip_temp one_batch_skip_temp one_batch_while_unrolled
    serving_unrolled_b64 serving_pallas_b1 serving_pallas_b64 one_batch_pallas one_batch_reference
    serving_tp2_b64 serving_dp2_b64)
mkdir -p "$results"
archive=${GPU_CHECKS_ARCHIVE:-$results.tgz}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PY=${PYTHON:-python3} MODEL=${MODEL:-/tmp/qwen2.5-0.5b-shape} results
TOKENIZER_DIR=${TOKENIZER_DIR:-.cache/models/SmolLM2-135M-Instruct}
export SERVER_ARGS="--load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-total-tokens 262144"
ONE_BATCH=(scripts/bench_one_batch.py --model-path "$MODEL" --load-format dummy --dtype bfloat16 --iters 20)
EVERY_CASE=(--decode-batches 1 8 32 64 --prefill-cases 1x512 4x128 --mixed-cases 32+1x256)

[ -d "$MODEL" ] || $PY scripts/write_model_config.py --out "$MODEL" >/dev/null

env_report() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c 'import jax, flax, transformers; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__,
"transformers", transformers.__version__)'
}

serving() {  # backend, concurrency, [name of a variant run], [its extra server flags], [no: no warm pass]
    local name=${3:-$1_b$2} warm=--warmup-pass
    [ "${5:-}" = no ] && warm=
    $PY scripts/bench_serving.py --launch "$MODEL" --server-args "$SERVER_ARGS --attention-backend $1 ${4:-}" \
        --num-prompts "$2" --input-len-range 128 128 --output-len-range 256 256 $warm \
        --disable-tqdm --server-log "$results/server_$name.log" --output-file "$results/serving_$name.json"
}
# A server of its own at this concurrency, a warm pass, then py-spy on the server during the
# measured pass: which host pieces (scheduler thread, event loop) a decode step waits on. The
# scheduler runs in the engine's process, a child of the server's: --subprocesses records both.
serving_host_profile() {
    local port=30123 server client spy
    $PY -m server.launch_server --model-path "$MODEL" --port $port $SERVER_ARGS \
        >"$results/server_host_profile_b$1.log" 2>&1 &
    server=$!
    until $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health')" 2>/dev/null; do
        kill -0 $server || return 1
        sleep 1
    done
    # 1024 new tokens each: at batch 64 an H200 served 256 in 0.88 s, and the recorded second
    # (0.8 s in) caught mostly the idle loop after the pass (fifth GPU session).
    local bench=($PY scripts/bench_serving.py --base-url "http://127.0.0.1:$port" --num-prompts "$1"
        --input-len-range 128 128 --output-len-range 1024 1024 --disable-tqdm)
    "${bench[@]}" >/dev/null
    "${bench[@]}" --output-file "$results/serving_host_profile_b$1.json" &
    client=$!
    sleep 0.8  # the client starts up first; the window should fall inside the measured pass
    # Two recordings of the same second: the GIL holders (Python work) and every thread's wall
    # time (--idle: the waits too, in dispatches, transfers and locks).
    ${PYSPY:-py-spy} record -p $server --subprocesses --gil --nonblocking --threads --format raw \
        -o "$results/host_b$1.txt" -d 1 -r 500 &
    spy=$!
    ${PYSPY:-py-spy} record -p $server --subprocesses --idle --nonblocking --threads --format raw \
        -o "$results/host_idle_b$1.txt" -d 1 -r 500
    wait $spy $client
    kill $server
    $PY scripts/host_profile_summary.py "$results/host_b$1.txt" --top 20
    $PY scripts/host_profile_summary.py "$results/host_idle_b$1.txt" --top 30 --lines
}
export -f env_report serving serving_host_profile

run_step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit} s)"
    timeout -k 5 "$limit" "$@" >"$results/$name.txt" 2>&1
    rc=$?
    pkill -f server.launch_server && sleep 2  # a launched server runs in its own session: timeout misses it
    tail -n 25 "$results/$name.txt"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    tar czf "$archive" -C "$(dirname "$results")" "$(basename "$results")"
}

for step in "${steps[@]}"; do
    case $step in
    env) run_step env 60 bash -c env_report ;;
    # Natively compiled kernels against their references (the interpreter-only tests skip themselves).
    kernel_tests) run_step kernel_tests 180 env XLA_PYTHON_CLIENT_PREALLOCATE=false \
        $PY -m pytest -q -m kernels tests/kernels -n 4 -p no:cacheprovider --timeout 120 ;;
    bench_kernels) run_step bench_kernels 150 $PY scripts/bench_kernels.py ;;
    one_batch_auto | one_batch_pallas) run_step "$step" 180 $PY "${ONE_BATCH[@]}" "${EVERY_CASE[@]}" \
        --attention-backend "${step#one_batch_}" --output-file "$results/$step.json" ;;
    # The layers unrolled, one weight buffer each (--layer-loop unrolled), against one_batch_auto's scan.
    one_batch_unrolled) run_step one_batch_unrolled 180 $PY "${ONE_BATCH[@]}" --layer-loop unrolled \
        --decode-batches 1 64 --prefill-cases 1x512 --mixed-cases 32+1x256 \
        --output-file "$results/one_batch_unrolled.json" ;;
    one_batch_reference) run_step one_batch_reference 120 $PY "${ONE_BATCH[@]}" --attention-backend reference \
        --decode-batches 1 64 --prefill-cases 1x512 --mixed-cases --output-file "$results/one_batch_reference.json" ;;
    # The decode step as CUDA graphs, loops included: with no conditional left in a greedy step
    # (the plain sampler), the layer loop is what keeps XLA from capturing the step whole.
    one_batch_command_buffers) run_step one_batch_command_buffers 180 env \
        XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE --xla_gpu_graph_min_graph_size=1" \
        $PY "${ONE_BATCH[@]}" --decode-batches 1 64 --prefill-cases --mixed-cases \
        --output-file "$results/one_batch_command_buffers.json" ;;
    # The bare decode step with one sampler dispatch a step, beside one_batch_decode (fused).
    one_batch_unfused) run_step one_batch_unfused 90 $PY "${ONE_BATCH[@]}" --fused-greedy-sampling off \
        --decode-batches 1 64 --prefill-cases --mixed-cases --output-file "$results/one_batch_unfused.json" ;;
    # The decode steps alone under XLA flags, each beside one_batch_decode (no flags) on the
    # same machine: slice fusion hands a scanned layer's weight slice straight to the GEMM
    # instead of copying it first (b=64: 97 copies, 0.52 ms a step); no command buffers shows
    # what XLA's default CUDA graphs give or cost; cuBLAS replaces the Triton GEMM fusions; both
    # together (slice fusion hands slices to cuBLAS calls, not to Triton's GEMM fusions).
    # SKIP_TEMP: a CUDA graph whose temporary buffer moved between runs is not updated (XLA maps
    # the buffer at a fixed virtual address instead, with its VMM allocator). Against the
    # unrolled step's slowness pipelined; it did not help (seventh GPU session).
    # while_unrolled: the scanned loop inside the graphs, unrolled there (weights stay stacked).
    one_batch_decode | one_batch_slice_fusion | one_batch_no_command_buffers | one_batch_cublas \
        | one_batch_cublas_slice_fusion | one_batch_skip_temp | one_batch_unrolled_skip_temp | one_batch_while_unrolled)
        declare -A flags=([one_batch_decode]="" [one_batch_slice_fusion]="--xla_gpu_enable_dynamic_slice_fusion=true"
            [one_batch_no_command_buffers]="--xla_gpu_enable_command_buffer=" [one_batch_cublas]="--xla_gpu_enable_triton_gemm=false"
            [one_batch_cublas_slice_fusion]="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true"
            [one_batch_skip_temp]="--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
            [one_batch_unrolled_skip_temp]="--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
            [one_batch_while_unrolled]="--xla_gpu_enable_command_buffer=+WHILE --xla_gpu_command_buffer_unroll_loops=true")
        loop=scan
        [ "$step" = one_batch_unrolled_skip_temp ] && loop=unrolled
        run_step "$step" 90 env XLA_FLAGS="${XLA_FLAGS:-} ${flags[$step]}" $PY "${ONE_BATCH[@]}" --layer-loop $loop \
            --decode-batches 1 64 --prefill-cases --mixed-cases --output-file "$results/$step.json" ;;
    # Kernel by kernel: where a batch-1 and a batch-64 decode step spend their time (traces stay in /tmp).
    # profile_decode_unrolled: the layers unrolled (no loop, so XLA's default CUDA graphs can take
    # the whole step), its steps traced back to back: the seventh GPU session found it 2.13 ms
    # synced and 2.26 pipelined at b=64 (2.02 and 2.98 at b=1), perhaps XLA re-recording the graph
    # for inputs at new addresses; the trace shows where the device waits between steps.
    profile_decode | profile_decode_unrolled) run_step "$step" 150 bash -c 'loop=$1; shift
        $PY "${@}" --attention-backend auto --layer-loop $loop --decode-batches 1 64 --prefill-cases \
        --mixed-cases --profile-dir /tmp/gpu_traces_$loop --profile-steps 5 --output-file "$results/$0.json" &&
        for case in /tmp/gpu_traces_$loop/*; do $PY scripts/trace_summary.py "$case" --steps 5 --top 25; done' \
        "$step" "$([ "$step" = profile_decode ] && echo scan || echo unrolled)" "${ONE_BATCH[@]}" \
        $([ "$step" = profile_decode_unrolled ] && echo --profile-pipelined) ;;
    host_profile_b64) run_step host_profile_b64 200 bash -c 'serving_host_profile 64' ;;
    serving_pallas_b1) run_step serving_pallas_b1 300 bash -c 'serving pallas 1' ;;
    serving_pallas_b64) run_step serving_pallas_b64 300 bash -c 'serving pallas 64' ;;
    serving_reference_b1) run_step serving_reference_b1 300 bash -c 'serving reference 1' ;;
    serving_reference_b64) run_step serving_reference_b64 300 bash -c 'serving reference 64' ;;
    # The layers unrolled, served (its own programs: a cold warm-up of the one-buffer-per-layer form took
    # 150 s in the second GPU session).
    serving_unrolled_b1 | serving_unrolled_b64) run_step "$step" 300 \
        bash -c 'serving reference "${0#serving_unrolled_b}" "${0#serving_}" "--layer-loop unrolled"' "$step" ;;
    # serving_reference_b64's workload in one process, no HTTP server, streamed as the server's
    # engine process streams: how much of the served step's host time is the server's (the fourth
    # GPU session: ITL 4.94 ms against a 2.68 ms step), and the scheduler thread's CPU per step.
    offline_b64) run_step offline_b64 240 $PY scripts/bench_offline.py --model-path "$MODEL" \
        --server-args "$SERVER_ARGS --attention-backend reference" --num-prompts 64 --input-len-range 128 128 \
        --output-len-range 256 256 --warmup-pass --repeats 2 --stream --output-file "$results/offline_b64.json" ;;
    # A fresh server's first burst, measured (no warm pass), the compile cache warm from the step
    # above: the shapes its warm-up does not compile (the fourth GPU session: 4204-4643 tok/s
    # against 10791-11767 once compiled; the decode widths now compile ahead, aside).
    serving_first_burst_b64) run_step serving_first_burst_b64 300 \
        bash -c 'serving reference 64 first_burst_b64 "" no' ;;
    # Fused greedy sampling (the default on a GPU) against one sampler dispatch a step.
    serving_unfused_b64) run_step serving_unfused_b64 300 \
        bash -c 'serving reference 64 unfused_b64 "--fused-greedy-sampling off"' ;;
    # Two GPUs or more (a one-GPU machine says so and moves on): the model split over two
    # (tensor parallelism), and two replicas of it (data parallelism), at batch 64.
    serving_tp2_b64 | serving_dp2_b64) run_step "$step" 300 bash -c '
        [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ] || { echo "skipped: needs two GPUs"; exit 0; }
        serving reference 64 "${0#serving_}" "--${0:8:2}-size 2"' "$step" ;;
    # The served batch-64 figure without XLA's CUDA graphs (its programs compile afresh: the flag
    # is part of the compile cache's key).
    serving_no_command_buffers_b64) run_step serving_no_command_buffers_b64 300 \
        env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
        bash -c 'serving reference 64 no_command_buffers_b64' ;;
    # offline_b64 with the layer loop inside XLA's CUDA graphs: the scheduler thread launches each
    # layer's ~24 kernels itself (0.6-0.7 ms of its 2.9 ms step at batch 64, fifth GPU session),
    # which a bare step's pipelined time hides and a served step pays.
    # Or the layers unrolled (no loop: XLA's default command buffers can take the whole step; its
    # cold warm-up took 150 s in the second GPU session, so not among the default steps).
    # Or the forward dispatched from the scheduler thread itself (`--dispatch-thread off`; a GPU's
    # default dispatches it from a thread of its own, so that the launch overlaps the previous
    # step's output work: not measured on a GPU yet).
    offline_b64_while_graphs | offline_b64_unrolled | offline_b64_no_dispatch_thread)
        declare -A variant=(
            [offline_b64_while_graphs]="--xla_gpu_enable_command_buffer=+WHILE --xla_gpu_graph_min_graph_size=1"
            [offline_b64_unrolled]="" [offline_b64_no_dispatch_thread]="")
        declare -A loop=([offline_b64_while_graphs]=scan [offline_b64_unrolled]=unrolled
            [offline_b64_no_dispatch_thread]=scan)
        declare -A dispatch=([offline_b64_while_graphs]=auto [offline_b64_unrolled]=auto
            [offline_b64_no_dispatch_thread]=off)
        run_step "$step" 300 env XLA_FLAGS="${XLA_FLAGS:-} ${variant[$step]}" \
            $PY scripts/bench_offline.py --model-path "$MODEL" \
            --server-args "$SERVER_ARGS --attention-backend reference --layer-loop ${loop[$step]} --dispatch-thread ${dispatch[$step]}" \
            --num-prompts 64 --input-len-range 128 128 --output-len-range 256 256 --warmup-pass --repeats 2 \
            --stream --output-file "$results/$step.json" ;;
    # offline_b64's workload with a tokenizer (SmolLM2's, carried from the model cache: the machine
    # has none; the Qwen shape's masks are then wider than it), no request constrained, then every
    # request following a regex: the masked sampler and the read-back each grammar step waits on.
    offline_tokenizer_b64 | offline_constrained_b64)
        declare -A constrained=([offline_tokenizer_b64]=0 [offline_constrained_b64]=64)
        mkdir -p /tmp/model_with_tokenizer && cp "$MODEL"/config.json "$TOKENIZER_DIR"/tokenizer*.json \
            /tmp/model_with_tokenizer/
        run_step "$step" 240 $PY scripts/bench_offline.py --model-path /tmp/model_with_tokenizer \
            --server-args "${SERVER_ARGS/--skip-tokenizer-init/} --attention-backend reference" \
            --num-prompts 64 --input-len-range 128 128 --output-len-range 256 256 --warmup-pass --repeats 2 \
            --stream --regex "[a-z,. ]+" --constrained "${constrained[$step]}" --output-file "$results/$step.json" ;;
    *) echo "unknown step $step" >&2 ;;
    esac
done
