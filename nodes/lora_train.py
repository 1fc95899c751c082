"""LoRATrain: SUBJECT + SD1.5 checkpoint -> LoRA file in models/loras (kohya keys)."""

from __future__ import annotations

from comfy_api.latest import io
from comfy_execution.graph_utils import ExecutionBlocker

from ..trainers.training.config import LoRATrainConfig
from .bridge import CATEGORY, SUBJECT, config_input
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

TRAIN_FIELDS = ("rank", "alpha", "steps", "unet_lr", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps",
                "batch_size", "seed", "precision", "gradient_checkpointing", "cache_latents")


class LoRATrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRATrain",
            display_name="LoRA Train (SD1.5)",
            category=CATEGORY,
            is_output_node=True,  # it writes a file: a graph that ends here is complete
            hidden=[io.Hidden.unique_id],
            description="Trains a LoRA on the subject images (UNet attention, and the text encoder when its "
                        "learning rate is above 0) and saves it to models/loras in the kohya format that "
                        "ComfyUI, A1111/Forge and diffusers load. Reports every step; cancel stops within "
                        "one step and writes nothing.",
            inputs=[
                SUBJECT.Input("subject", tooltip="Training set from Load Subject Images."),
                checkpoint_input(),
                output_name_input("subject_lora"),
                overwrite_input(),
                *[config_input(LoRATrainConfig, name) for name in TRAIN_FIELDS],
                # Prior preservation: optional inputs (with defaults) so API prompts written before
                # they existed still validate.
                *[config_input(LoRATrainConfig, name, optional=True) for name in PRIOR_FIELDS],
                class_folder_input(),
                config_input(LoRATrainConfig, "record_sources", optional=True),
                config_input(LoRATrainConfig, "optimizer", optional=True),
                config_input(LoRATrainConfig, "conv_layers", optional=True),
                config_input(LoRATrainConfig, "lora_type", optional=True),
                *[config_input(LoRATrainConfig, name, optional=True) for name in EMA_FIELDS + CAPTION_FIELDS],
                *durability_inputs(),
                *watch_inputs(),
                fidelity_input(),
                *scale_out_inputs(LoRATrainConfig),
            ],
            outputs=[
                io.LoraModel.Output(display_name="LORA_MODEL",
                                    tooltip="The trained LoRA (also accepted by ComfyUI's core LoRA nodes)."),
                io.String.Output(display_name="lora_name", tooltip="File name in models/loras."),
                io.Image.Output(display_name="loss_curve",
                                tooltip="Training loss per step, its moving average and the validation loss."),
                io.Image.Output(display_name="samples",
                                tooltip="Sample images made while training: one row per sample round (step), one "
                                        "column per sample prompt."),
                io.LoraModel.Output(display_name="best_lora",
                                    tooltip="With fidelity_models: the LoRA of the best scored step (its step file); "
                                            "without: the final LoRA."),
                io.String.Output(display_name="best_lora_name",
                                 tooltip="That file's name in models/loras (a step file is in the run's subfolder)."),
                launch_command_output(),
            ],
        )

    @classmethod
    def validate_inputs(cls, output_name, ckpt_name, unet_lr, text_encoder_lr, steps, lr_warmup_steps, sample_prompts="") -> bool | str:
        # Only the inputs named here lose ComfyUI's own min/max check; the config re-checks them
        # (and catches NaN, which passes a min/max comparison).
        return check_inputs(output_name, LoRATrainConfig, ckpt_name, sample_prompts, unet_lr=unet_lr, text_encoder_lr=text_encoder_lr,
                            steps=steps, lr_warmup_steps=lr_warmup_steps)

    @classmethod
    def execute(cls, subject, ckpt_name, output_name, overwrite, class_folder=None, **settings) -> io.NodeOutput:
        processes = export_processes_of(settings)
        if processes:  # export only: nothing downstream runs (there is no file yet)
            command, shown_ui = export_training_node(cls, LoRATrainConfig, subject, ckpt_name, output_name,
                                                     class_folder, settings, processes)
            return io.NodeOutput(*[ExecutionBlocker(None)] * 6, command, ui=shown_ui)
        run = run_training_node(cls, LoRATrainConfig, subject, ckpt_name, output_name,
                                overwrite, class_folder, settings)
        final = run.job.tensors()
        best = final if run.best_path == run.job.path else _load(run.best_path)
        return io.NodeOutput(final, run.job.path.name, run.curve, run.samples, best, run.best_name, "", ui=run.ui)


def _load(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
