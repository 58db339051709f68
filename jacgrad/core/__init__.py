"""jacgrad.core: The ground floor: array backends (NumPy, CuPy) and foreign arrays, input
validation, lazy optional imports, the sample RNG, renamed-name warnings, the registry of calls
into higher subpackages' functions, and the CUDA build step that compiles source text on first
use. Imports nothing else of jacgrad.
"""
