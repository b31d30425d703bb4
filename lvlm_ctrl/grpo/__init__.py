"""The two-stage controller trained with GRPO: policy heads, rewards, rollouts, the Lightning module."""
