//! The rollout plan, step by step.
