"""LoadFidelityModels and SubjectFidelity: the DreamBooth paper's DINO, CLIP-I and CLIP-T scores of
generated images against the subject's photos, from evaluation models in models/subject_eval/."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..trainers.eval import fidelity
from .bridge import CATEGORY, SUBJECT, shown, user_facing_errors
from .scoring import FIDELITY_MODELS, options, resolve, score_on_device, scoring_inputs
from .training_shared import to_image


class LoadFidelityModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadFidelityModels",
            display_name="Load Fidelity Models (DINO, CLIP)",
            category=CATEGORY,
            description="Loads the evaluation models of the DreamBooth paper from models/subject_eval/: a DINO "
                        "ViT (facebook/dino-vits16) and a CLIP model with both towers. Offline, safetensors "
                        "only.",
            inputs=[
                io.Combo.Input("dino_model", options=options("dino"),
                               tooltip="DINO ViT folder in models/subject_eval (config.json, model.safetensors, "
                                       "preprocessor_config.json), e.g. facebook/dino-vits16."),
                io.Combo.Input("clip_model", options=options("clip"),
                               tooltip="CLIP folder in models/subject_eval (both towers, projections, tokenizer "
                                       "and preprocessor files), e.g. openai/clip-vit-base-patch32."),
            ],
            outputs=[FIDELITY_MODELS.Output(display_name="FIDELITY_MODELS",
                                            tooltip="For Subject Fidelity.")],
        )

    @classmethod
    def validate_inputs(cls, dino_model, clip_model) -> bool | str:
        # Runs at /prompt: a missing or wrong folder is refused before anything is queued.
        try:
            resolve("dino", dino_model)
            resolve("clip", clip_model)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, dino_model, clip_model) -> io.NodeOutput:
        with user_facing_errors():
            dino_dir, clip_dir = resolve("dino", dino_model), resolve("clip", clip_model)
            # Kept on the CPU between uses: Subject Fidelity moves them to the device while it scores.
            return io.NodeOutput(fidelity.load_fidelity_models(dino_dir, clip_dir, "cpu", shown))


class SubjectFidelity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SubjectFidelity",
            display_name="Subject Fidelity (DINO, CLIP-I, CLIP-T)",
            category=CATEGORY,
            is_output_node=True,  # its table is the result a graph may end with
            description="Scores generated images as the DreamBooth paper does. DINO and CLIP-I: mean similarity "
                        "of every generated-real pair (identity: higher is closer to the subject). CLIP-T: mean "
                        "similarity of each image with its prompt (falls when the model ignores the prompt). "
                        "Paper, Stable Diffusion DreamBooth: 0.668 / 0.803 / 0.305; real photos 0.774 / 0.885.",
            inputs=[
                io.Image.Input("images", tooltip="The generated images (a batch)."),
                FIDELITY_MODELS.Input("fidelity_models", tooltip="From Load Fidelity Models."),
                io.String.Input("prompts", multiline=True, default="a photo of a dog",
                                tooltip="The prompt the images were made with: one line for all, or one line per "
                                        "image in batch order. Write the class noun where the prompt has the "
                                        "rare token (as the paper scores CLIP-T), e.g. 'a dog on the beach'."),
                SUBJECT.Input("subject", optional=True,
                              tooltip="The real subject photos (from Load Subject Images), or use real_images."),
                io.Image.Input("real_images", optional=True,
                               tooltip="The real subject photos as an IMAGE batch (instead of subject)."),
            ],
            outputs=[
                io.Float.Output(display_name="DINO", tooltip="Mean DINO similarity, generated vs real."),
                io.Float.Output(display_name="CLIP-I", tooltip="Mean CLIP image similarity, generated vs real."),
                io.Float.Output(display_name="CLIP-T", tooltip="Mean CLIP similarity of each image with its prompt."),
                io.String.Output(display_name="table", tooltip="Means, each image's scores, the paper's yardstick."),
                io.Image.Output(display_name="table_image", tooltip="The same table as an image."),
            ],
        )

    @classmethod
    def execute(cls, images, fidelity_models, prompts, subject=None, real_images=None) -> io.NodeOutput:
        with user_facing_errors():
            real = scoring_inputs(fidelity_models, subject, real_images)
            if real is None:
                raise ValueError("fidelity_models is not connected: connect Load Fidelity Models")
            fidelity.prompts_for(prompts, len(images))  # a wrong prompt count fails before any model runs
            scores = score_on_device(fidelity_models, images, real, prompts)
        lines = fidelity.table_lines(scores)
        table = to_image(fidelity.table_image(scores))
        previews = ui.PreviewImage(table, cls=cls).values
        return io.NodeOutput(scores.dino, scores.clip_i, scores.clip_t, "\n".join(lines), table,
                             ui={"images": previews, "text": ["\n".join(lines)]})
