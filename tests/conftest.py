"""Test-session set-up shared by every test file."""
import os

# Triton kernels (the fused focal attention) run under Triton's CPU interpreter in the tests. The
# variable must be set before the kernels are defined, i.e. before `models` is imported.
os.environ.setdefault('TRITON_INTERPRET', '1')
