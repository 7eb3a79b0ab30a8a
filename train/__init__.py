"""Velocity distillation of Wan DiTs: dense frozen teacher, block-sparse student, sharded and multi-host."""
