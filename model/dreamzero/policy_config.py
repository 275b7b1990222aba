"""The closed-loop policy's switches (PolicyConfig; the policy itself is dreamzero.engine.Policy) and the release's
constants they use: the static step mask, the dynamic DiT-cache thresholds, the default negative prompt.

Switches, one per row of the paper's Table 1:
  cfg_mode        'sequential' (two forwards), 'batched' (one forward over both branches), 'parallel' (one branch
                  per rank of a torch.distributed group of 2: NCCL on GPUs, gloo on CPUs)
  dit_cache       'off', 'static' (the release's 8-of-16 step mask), 'dynamic' (cosine similarity of the last two
                  computed guided video velocities: > 0.95 reuses that step and the next 3, > 0.93 that step and
                  the next one; the first 2 steps always run)
  num_steps       16 (the release) or 1 (DreamZero-Flash)
  actions_only    with a single denoising step the unconditional branch cannot change the actions: skip it (and
                  its cache) -- exactly the same actions at half the compute. Not allowed with return_video.
  fused_control   the replacement pass and the first denoising step in one forward (the 'control' layout)
  sampler_device  'model' (the sampler's tensors on the model's device, no host syncs) or 'cpu' (the baseline)
  compile         None or a torch.compile backend ('inductor', 'aot_eager', ...) for the DiT blocks: one compiled
                  graph per layout, shared by every block (dreamzero.compiled); 'reduce-overhead' is 'inductor'
                  with graphs=True. The model is compiled in place (other policies over it run the compiled blocks
                  too; dreamzero.compiled.uncompile_blocks undoes it)
  graphs          each layout's whole forward replayed from static buffers, captured as a CUDA graph on CUDA
                  (dreamzero.compiled.GraphedForward; on a CPU the same path runs uncaptured)
Compilation and capture are lazy (each layout at its first forward) and cost what `Policy.compile_stats` says.
"""
from __future__ import annotations

from dataclasses import dataclass

# The release's default DiT step mask: 8 of 16 steps run (NUM_DIT_STEPS=8).
STATIC_MASK_16 = (True, True, True, False, False, False, True, False, False, False, True, False, False, True, True,
                  True)
DYNAMIC_THRESHOLDS = ((0.95, 4), (0.93, 2))
# The release's negative prompt for the unconditional branch (its DreamTransform sets "text_negative" to this for
# every sample; it is the English version of Wan's default negative prompt).
DEFAULT_NEGATIVE_PROMPT = (
    "Vibrant colors, overexposed, static, blurry details, text, subtitles, style, artwork, painting, image, still, "
    "grayscale, dull, worst quality, low quality, JPEG artifacts, ugly, mutilated, extra fingers, bad hands, bad face, "
    "deformed, disfigured, mutated limbs, fused fingers, stagnant image, cluttered background, three legs, many people "
    "in the background, walking backwards.")


@dataclass(frozen=True)
class PolicyConfig:
    num_steps: int = 16
    shift: float = 5.0
    guidance: float = 5.0
    cfg_mode: str = "sequential"
    dit_cache: str = "off"
    static_mask: tuple | None = None
    actions_only: bool = False
    return_video: bool = False
    fused_control: bool = False
    sampler: str = "unipc"
    sampler_device: str = "model"
    overflow: str = "reset"
    rule: str | None = None
    seed: int = 1140
    smooth: bool = True
    compile: str | None = None
    negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT   # the unconditional branch's text; None: zero features
    graphs: bool = False

    def __post_init__(self):
        choices = dict(cfg_mode=("sequential", "batched", "parallel"), dit_cache=("off", "static", "dynamic"),
                       sampler=("unipc", "euler"), sampler_device=("model", "cpu"), overflow=("reset", "roll"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str or None, got {type(self.negative_prompt).__name__}")
        if self.compile is not None and not isinstance(self.compile, str):
            raise TypeError(f"compile must be None or a torch.compile backend name, got {self.compile!r}")
        if self.actions_only and self.return_video:
            raise ValueError("actions_only skips the unconditional branch, so it cannot return the guided video")
        mask = self.step_mask()
        if len(mask) != self.num_steps or not mask[0]:
            raise ValueError(f"static_mask must have num_steps entries and run the first step, got {mask}")

    def step_mask(self) -> tuple:
        if self.static_mask is not None:
            return tuple(bool(m) for m in self.static_mask)
        if self.dit_cache == "static" and self.num_steps == 16:
            return STATIC_MASK_16
        if self.dit_cache == "static":
            raise ValueError("the release's static mask is defined for 16 steps: pass static_mask")
        return (True,) * self.num_steps

    @property
    def skips_uncond(self) -> bool:
        return self.actions_only and self.num_steps == 1

    @property
    def compile_backend(self) -> str | None:
        return "inductor" if self.compile == "reduce-overhead" else self.compile

    @property
    def use_graphs(self) -> bool:
        return self.graphs or self.compile == "reduce-overhead"

