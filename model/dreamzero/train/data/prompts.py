"""The instruction as the release's collator words it for the text encoder (per-embodiment templates)."""
from __future__ import annotations

DEFAULT_INSTRUCTION = "Perform the default behavior."

_DROID_PROMPT = ("A multi-view video shows that a robot {t} The video is split into three views: The top view shows "
                 "the camera view from the robot's wrist, the bottom-left view shows the camera view from the left "
                 "exterior camera, and the bottom-right view shows the camera view from the right exterior camera. "
                 "During training, one of the two bottom exterior views may be a black screen (dropped view). The "
                 "robot {t}")
_AGIBOT_PROMPT = ("A multi-view video shows that a robot {t} The video is split into four views: The top-left view "
                  "shows the camera view from the robot's head, the top-right view shows the camera view from the "
                  "right hand, the bottom-left view shows the camera view from the left hand, and the bottom-right "
                  "view is a black screen (inactive view). The robot {t}")
_YAM_PROMPT = ("A multi-view video shows that a robot {t} The video is split into four views: The top-left view "
               "shows the top camera, the top-right view shows the right camera, the bottom-left view shows the left "
               "camera, and the bottom-right view is a black screen. The robot {t}")


def build_prompt(task: str, embodiment_tag: str | None, template: str = "auto") -> str:
    """The instruction as the release's collator words it for the text encoder (DROID, AgiBot and YAM templates;
    other embodiments, or template "none", get the task text itself)."""
    if template == "none":
        return task
    t = task.lower()
    if embodiment_tag == "oxe_droid":
        return _DROID_PROMPT.format(t=t)
    if embodiment_tag in ("agibot", "xdof"):
        return _AGIBOT_PROMPT.format(t=t)
    if embodiment_tag == "yam":
        return _YAM_PROMPT.format(t=t)
    return task
