"""Commands the model package adds to the `dz` command line (dz_kernels/cli.py merges this dict into its own).

Each entry is name -> ("module:function", one-line help); the function takes argv (list of str) and returns an exit
code. Nothing is imported here: a command's module loads only when that command runs.
"""

COMMANDS = {
    "serve": ("dreamzero.serve:serve_main",
              "serve a DreamZero policy over a websocket (msgpack); binds 127.0.0.1 unless --host"),
    "client": ("dreamzero.serve:client_main",
               "talk to a policy server: health and metadata, or --demo for a short episode"),
}
