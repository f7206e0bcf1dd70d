"""The shipped world model (tav/assets/world_model/, trained by tav.world_training) as a pipeline folder."""
import os
import shutil

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "world_model")
RECORD = "world_model.json"


def write_world_pipeline(output_dir, source=ASSET_DIR):
    """Copy the shipped pipeline folder (model_index.json, scheduler/, tokenizer/, text_encoder/, unet/, vae/ and
    the training record) to `output_dir`; returns it."""
    if not os.path.isfile(os.path.join(source, "model_index.json")):
        raise FileNotFoundError(f"no world model at {source} (model_index.json missing); run "
                                f"'python tools/make_world_model.py OUT --retrain' to train one")
    shutil.copytree(source, output_dir, dirs_exist_ok=True)
    return output_dir
