#!/usr/bin/env bash
# SD2 + COCO collusion sweep on SLURM (experiments/slurm/README.md explains each step).
#
# Run it on a login node inside tmux/screen: each `python -m fingerprint_lm -m ...` submits through
# submitit and waits for its jobs (the sweep summary is written when the last point ends).
# Never run on a real cluster (the project's machine has neither SLURM nor a GPU); what each step
# hands to sbatch is tested with a stand-in sbatch (tests/test_slurm.py).
#
#   PARTITION=gpu ACCOUNT=mylab SD2_VAE=/data/sd2/vae COCO=/data/coco OUT=/scratch/$USER/fplm \
#       bash experiments/slurm/sd2_coco_collusion_sweep.sh
#   MODEL=$OUT/sd2_coco_train/0/fingerprint_model PARTITION=gpu ... bash ...   # sweep a trained model only
set -euo pipefail

: "${PARTITION:?set PARTITION (a GPU partition)}"
: "${ACCOUNT:=}"                      # empty: no --account
: "${SD2_VAE:=/data/sd2/vae}"         # the vae/ folder of an SD 2.x pipeline: config.json + *.safetensors
: "${COCO:=/data/coco}"               # annotations/captions_train2017.json + train2017/*.jpg
: "${OUT:=$PWD/outputs/slurm}"        # shared filesystem: run dirs, sweep dirs
: "${GPUS:=4}"                        # GPUs per node for training (one task per GPU)
: "${NODES:=1}"
: "${STEPS:=10000}"                   # training steps (time a short run first: README "Sizing")
: "${BITS:=48}"
: "${METHOD:=pnm}"                    # conf/method/: trained in step 1, the only method of the sweep's grid
: "${MODEL:=}"                        # a trained fingerprint model dir: skip step 1 and sweep it
export FINGERPRINT_LM_CACHE="${FINGERPRINT_LM_CACHE:-$OUT/cache}"   # shared by every job
export WANDB_MODE="${WANDB_MODE:-offline}"                          # online: WANDB_MODE=online + wandb login

account=()  # expanded as ${account[@]+...}: bash before 4.4 calls an empty array unbound under set -u
if [[ -n "$ACCOUNT" ]]; then account=("hydra.launcher.account=$ACCOUNT"); fi

# 1. Train the PNM + extractor on SD2's VAE and COCO: one job, GPUS x NODES ranks (DDP).
train() {
    python -m fingerprint_lm -m hydra/launcher=slurm "method=$METHOD" \
        model=sd_vae "model.path=$SD2_VAE" data=coco_stream "data.coco_root=$COCO" \
        trainer=ddp "trainer.devices=$GPUS" "trainer.num_nodes=$NODES" \
        "fingerprint_bits=$BITS" "method.steps=$STEPS" logger=wandb \
        "hydra.sweep.dir=$OUT/sd2_coco_train" \
        "hydra.launcher.partition=$PARTITION" ${account[@]+"${account[@]}"} \
        hydra.launcher.timeout_min=720 hydra.launcher.cpus_per_task=8 hydra.launcher.mem_gb=128
}

# The sweep over the trained model: its method alone (a given checkpoint serves one method and one
# code length), every ACT type and attack/colluder case, less the points sweep.grid.skip leaves out.
sweep() {
    python -m fingerprint_lm hydra/launcher=slurm +experiment=collusion_sweep \
        "sweep.grid.method=$METHOD" "sweep.grid.fingerprint_bits=$BITS" "sweep.checkpoint=$MODEL" \
        trainer=gpu sweep.images=data data=coco "data.coco_root=$COCO" data.coco_split=val2017 data.resolution=256 \
        "hydra.sweep.dir=$OUT/sd2_coco_collusion" \
        "hydra.launcher.partition=$PARTITION" ${account[@]+"${account[@]}"} \
        hydra.launcher.timeout_min=480 hydra.launcher.cpus_per_task=16 hydra.launcher.mem_gb=64 "$@"
}

main() {
    if [[ -z "$MODEL" ]]; then
        train
        MODEL="$OUT/sd2_coco_train/0/fingerprint_model"
    fi
    test -f "$MODEL/fingerprint.json" || { echo "error: no fingerprint model at $MODEL" >&2; exit 1; }
    # 2. One point first: it trains and caches the fid_proxy feature net the other points load.
    sweep sweep.grid.act=none sweep.grid.case=none_c1
    # 3. The grid, one array element per point; the point from step 2 is skipped (same point_key),
    #    summary.csv/.md + plots land in the sweep dir.
    sweep
}

# run when executed; sourced (the tests), only the functions above are defined
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then main; fi
