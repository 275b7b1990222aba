"""A DROID evaluation client on the real `openpi-client` package, run by test_serve_openpi_client.py in an environment
of its own (openpi-client pins numpy < 2; nothing of this project is importable there).

    python openpi_client_driver.py URL OUT.npz      -> one JSON object on stdout, the arrays sent/received in OUT.npz

Two clients, as robot users run them:
- openpi's WebsocketClientPolicy as is (no session id, no endpoint): metadata, an episode of single frames, a
  refused request (a view of the wrong size), the episode going on;
- the DreamZero release's eval_utils/policy_client.py (RoboArena's interface: "endpoint": "infer" | "reset",
  "session_id" as its run_sim_eval.py sends it, the exterior views numbered from 0): an episode, a reset, the next.
"""
import json
import sys

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy


class RoboArenaClient(WebsocketClientPolicy):
    """eval_utils/policy_client.py of the release: the same socket, with an endpoint field."""

    def infer(self, obs):
        return super().infer(dict(obs, endpoint="infer"))

    def reset(self, reset_info):
        self._ws.send(self._packer.pack(dict(reset_info, endpoint="reset")))
        return self._ws.recv()


def observation(rng, h, w, exteriors=("exterior_image_1_left", "exterior_image_2_left"), **extra):
    obs = {"observation/" + k: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
           for k in exteriors + ("wrist_image_left",)}
    obs["observation/joint_position"] = rng.uniform(-1, 1, 7)
    obs["observation/gripper_position"] = rng.uniform(0, 1, 1)
    obs["observation/cartesian_position"] = np.zeros(6)
    obs["prompt"] = "put the cube in the bowl"
    obs.update(extra)
    return obs


def main(url, out):
    rng = np.random.default_rng(0)
    arrays, log = {}, {"calls": []}

    def call(client, name, obs):
        i = len(log["calls"])
        for k, v in obs.items():
            if isinstance(v, np.ndarray):
                arrays["%d/%s" % (i, k)] = v
        try:
            r = client.infer(dict(obs))
        except RuntimeError as e:               # openpi-client raises a text reply as RuntimeError
            log["calls"].append({"client": name, "error": str(e)})
            return
        a = r["actions"]
        arrays["%d/actions" % i] = a
        log["calls"].append({"client": name, "shape": list(a.shape), "dtype": str(a.dtype),
                             "same_action_key": bool(np.array_equal(r["action"], a)),
                             "episode": r["episode"], "server_timing": r["server_timing"],
                             "prompt": obs["prompt"], "session_id": obs.get("session_id"),
                             "naming": "release" if "observation/exterior_image_0_left" in obs else "dataset"})

    plain = WebsocketClientPolicy(url)
    meta = plain.get_server_metadata()
    log["metadata"] = meta
    h, w = meta["image_resolution"]
    for _ in range(4):
        call(plain, "openpi", observation(rng, h, w))
    bad = observation(rng, h, w)
    bad["observation/wrist_image_left"] = np.zeros((h + 2, w, 3), np.uint8)
    call(plain, "openpi", bad)
    call(plain, "openpi", observation(rng, h, w))

    arena = RoboArenaClient(url)
    log["arena_metadata"] = arena.get_server_metadata()
    release = ("exterior_image_0_left", "exterior_image_1_left")
    for _ in range(2):
        call(arena, "roboarena", observation(rng, h, w, release, session_id="sim-episode-1"))
    log["reset_reply"] = arena.reset({"session_id": "sim-episode-1"})
    call(arena, "roboarena", observation(rng, h, w, release, session_id="sim-episode-1"))
    np.savez(out, **arrays)
    print(json.dumps(log))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
