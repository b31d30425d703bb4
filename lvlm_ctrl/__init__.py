"""lvlm_ctrl: latency-budget controllers for Mixture-of-Experts vision-language models."""

__version__ = "0.1.0"

from omegaconf import OmegaConf


def _by_env(env: str, profile, online):
    """A default that differs with controller.env (`${by_env:<env>,<profile value>,<online value>}`):
    online, the latency model's first fit times fewer questions up front (profile.measured), since
    the run keeps timing. A value given on the command line replaces the interpolation as any
    override does."""
    return online if env == "online" else profile


OmegaConf.register_new_resolver("by_env", _by_env, replace=True)
