"""Tests of the research harness (scripts/: benchmarks, the experiment runner and report, the GPU
scripts). The product's tests are one folder up; tests/conftest.py's fixtures serve both."""
