"""dreamzero.train: training DreamZero (flow matching with teacher forcing, DreamZero-Flash, FSDP2, LeRobot data).

    step.py       the training step: noise levels from the scheduler's table (base / Flash), the teacher-forcing
                  sequence, flow-matching targets, the weighted video + masked action loss; FLOP counts
    data/         LeRobot v2.x / v3.x reader: clips of K chunks (tiled views at 5 FPS, action chunks, relative
                  actions, q99 normalization, idle-action filter), the release's metadata files read as is
    prepare.py    `dz prepare-data`: clips encoded once with the frozen VAE / CLIP / umT5, stored beside the dataset;
                  PreparedDataset reads them back for the trainer
    trainer.py    Trainer: AdamW + cosine schedule, bf16 autocast, activation checkpointing, FSDP2 under torchrun,
                  atomic sharded checkpoints (torch.distributed.checkpoint), exact resume, TensorBoard/tqdm/MFU
    checkpoint_dir.py  the checkpoint folders: which is complete, which a run resumes from, pruning, kill cleanup
    export.py     consolidated safetensors (dreamzero.checkpoint) from a sharded checkpoint or a live trainer
    synthetic.py  a small synthetic LeRobot dataset for tests and demos
    cli.py        COMMANDS: train, prepare-data, make-synthetic-data, export
Nothing is imported here; import the submodules.
"""
