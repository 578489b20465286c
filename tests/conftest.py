import os
import sys

# the top-level modules are scripts in the nanoGPT way: make them importable from the tests
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
