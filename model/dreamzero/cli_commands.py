"""Commands the model package adds to the `dz` command line (dz_kernels/cli.py merges this dict into its own).

Each entry is name -> ("module:function", one-line help); the function takes argv (list of str) and returns an exit
code. Nothing is imported here: a command's module loads only when that command runs.
"""

COMMANDS = {
    "serve": ("dreamzero.serve.cli:serve_main",
              "serve a DreamZero policy over a websocket (msgpack); binds 127.0.0.1 unless --host"),
    "client": ("dreamzero.serve.cli:client_main",
               "talk to a policy server: health and metadata, or --demo for a short episode"),
    "make-synthetic-data": ("dreamzero.train.cli:make_synthetic_data_main",
                            "write a small synthetic LeRobot dataset (tests and demos)"),
    "prepare-data": ("dreamzero.train.cli:prepare_data_main",
                     "encode a LeRobot dataset's latents and text/image features once, for training"),
    "train": ("dreamzero.train.cli:train_main", "train DreamZero (flow matching, teacher forcing, FSDP2 via torchrun)"),
    "export": ("dreamzero.train.cli:export_main", "export a training checkpoint to consolidated safetensors"),
}
