"""DreamBoothTrain: SUBJECT + SD1.5 checkpoint -> a fine-tuned checkpoint in models/checkpoints,
loaded back by ComfyUI's own checkpoint loader as MODEL, CLIP and VAE."""

from __future__ import annotations

import comfy.sd
import folder_paths
from comfy_api.latest import io
from comfy_execution.graph_utils import ExecutionBlocker

from ..trainers.training.config import DreamBoothTrainConfig
from .bridge import CATEGORY, SUBJECT, config_input, user_facing_errors
from .training_shared import (
    CAPTION_FIELDS,
    EMA_FIELDS,
    PRIOR_FIELDS,
    check_inputs,
    checkpoint_input,
    class_folder_input,
    durability_inputs,
    export_processes_of,
    export_training_node,
    fidelity_input,
    launch_command_output,
    output_name_input,
    overwrite_input,
    run_training_node,
    scale_out_inputs,
    watch_inputs,
)

TRAIN_FIELDS = ("steps", "unet_lr", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps", "batch_size", "seed",
                "optimizer", "precision", "gradient_checkpointing", "cache_latents", *PRIOR_FIELDS,
                "save_precision")
# The lean options for small GPUs: optional inputs (with defaults) so API prompts written before
# they existed still validate.
LEAN_FIELDS = ("fused_backward", "weight_precision")


class DreamBoothTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothTrain",
            display_name="DreamBooth Train (SD1.5)",
            category=CATEGORY,
            is_output_node=True,  # it writes a file: a graph that ends here is complete
            hidden=[io.Hidden.unique_id],
            description="Fine-tunes the whole SD1.5 UNet (and the text encoder when its learning rate is above "
                        "0) on the subject, with prior preservation: class images generated once from the "
                        "same base model with the class prompt (cached in models/dreambooth_studio/class_images and reused by "
                        "every run with the same settings) or taken from a class folder. Saves a single-file "
                        "checkpoint to models/checkpoints and loads it back with ComfyUI's checkpoint loader. "
                        "Progress covers class-image generation and every training step; cancel stops within "
                        "one step and writes nothing.",
            inputs=[
                SUBJECT.Input("subject", tooltip="Training set from Load Subject Images (its class prompt is "
                                                 "used for the class images)."),
                checkpoint_input(),
                output_name_input("subject_dreambooth"),
                overwrite_input(),
                *[config_input(DreamBoothTrainConfig, name) for name in TRAIN_FIELDS],
                *[config_input(DreamBoothTrainConfig, name, optional=True) for name in LEAN_FIELDS],
                class_folder_input(),
                config_input(DreamBoothTrainConfig, "record_sources", optional=True),
                *[config_input(DreamBoothTrainConfig, name, optional=True) for name in EMA_FIELDS + CAPTION_FIELDS],
                *durability_inputs(),
                *watch_inputs(),
                fidelity_input(),
                *scale_out_inputs(DreamBoothTrainConfig),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The fine-tuned UNet, loaded from the saved file."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder from the saved file."),
                io.Vae.Output(display_name="VAE", tooltip="The VAE from the saved file (unchanged by training)."),
                io.String.Output(display_name="ckpt_name", tooltip="File name in models/checkpoints."),
                io.Image.Output(display_name="loss_curve",
                                tooltip="Loss per step; with prior preservation also the subject (instance) "
                                        "and class (prior) parts."),
                io.String.Output(display_name="report",
                                 tooltip="Where the class images came from (generated now, reused, or your "
                                         "folder), how many, and whether the checkpoint was trained or reused."),
                io.Image.Output(display_name="samples",
                                tooltip="Sample images made while training: one row per sample round (step), one "
                                        "column per sample prompt."),
                io.String.Output(display_name="best_ckpt_name",
                                 tooltip="With fidelity_models: the checkpoint of the best scored step in "
                                         "models/checkpoints (a step file, in the run's subfolder); without: the "
                                         "final one."),
                launch_command_output(),
            ],
        )

    @classmethod
    def validate_inputs(cls, output_name, ckpt_name, unet_lr, text_encoder_lr, steps, lr_warmup_steps, sample_prompts="",
                        prior_loss_weight=1.0, class_guidance=7.5) -> bool | str:
        # Only the inputs named here lose ComfyUI's own min/max check; the config re-checks them
        # (and catches NaN, which passes a min/max comparison).
        return check_inputs(output_name, DreamBoothTrainConfig, ckpt_name, sample_prompts, unet_lr=unet_lr, text_encoder_lr=text_encoder_lr,
                            steps=steps, lr_warmup_steps=lr_warmup_steps, prior_loss_weight=prior_loss_weight,
                            class_guidance=class_guidance)

    @classmethod
    def execute(cls, subject, ckpt_name, output_name, overwrite, class_folder=None, **settings) -> io.NodeOutput:
        processes = export_processes_of(settings)
        if processes:  # export only: nothing downstream runs (there is no file yet)
            command, shown_ui = export_training_node(cls, DreamBoothTrainConfig, subject, ckpt_name, output_name,
                                                     class_folder, settings, processes)
            return io.NodeOutput(*[ExecutionBlocker(None)] * 8, command, ui=shown_ui)
        run = run_training_node(cls, DreamBoothTrainConfig, subject, ckpt_name, output_name,
                                overwrite, class_folder, settings)
        job = run.job
        # Exactly what a user gets from Load Checkpoint on this file later.
        with user_facing_errors():
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(
                str(job.path), output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
        return io.NodeOutput(model, clip, vae, job.path.name, run.curve, job.report(), run.samples, run.best_name,
                             "", ui=run.ui)
