import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# MinkowskiEngine warns on every import that it was built without CUDA.
warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY flag")
